"""The ``localllm`` command: ``serve | run | pull | list | show | cp | rm | create | ps | stop``.

Mirrors the ``ollama`` CLI. Errors print one line (``Error: ...``) to stderr and exit 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

from .download import TqdmPullProgress
from .model_info import InvalidModelFile
from .modelfile import (LIST_PARAMETERS, ModelfileError, create_model, format_parameters, is_path_reference,
                        parse_modelfile, parse_parameter, render_modelfile)
from .store import InvalidModelName, ModelNotFound, ModelStore, PullError

CHAT_HELP = """Available commands:
  /set parameter NAME VALUE   set a generation option (temperature, top_k, top_p, min_p, num_ctx,
                              seed, num_predict, repeat_penalty, repeat_last_n, stop WORD...)
  /set system TEXT            set the system message
  /set think, /set nothink    turn a reasoning model's thinking on or off
  /show parameters            show the options set in this session
  /clear                      forget the conversation so far
  /bye                        exit
  /?, /help                   this help
Use \"\"\" to begin and end a multi-line message."""


class CLIError(Exception):
    """A failure to report as one line, exit status 1."""


CLEAN_ERRORS = (CLIError, ModelNotFound, InvalidModelName, InvalidModelFile, PullError, ModelfileError,
                FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    global _server_available
    _server_available = None
    parser = build_parser()
    args = parser.parse_args(run_flags_first(sys.argv[1:] if argv is None else list(argv)))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args) or 0
    except CLEAN_ERRORS as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:                 # `localllm run ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


RUN_FLAGS = ("--think", "--no-think", "--hide-thinking")


def run_flags_first(argv: list[str]) -> list[str]:
    """``run MODEL PROMPT... --no-think`` as ``run --no-think MODEL PROMPT...`` (the prompt words come last
    for argparse; Ollama's CLI takes the flags anywhere). Words after ``--`` stay prompt words."""
    if not argv or argv[0] != "run":
        return argv
    rest = argv[1:]
    end = rest.index("--") if "--" in rest else len(rest)
    flags = [word for word in rest[:end] if word in RUN_FLAGS]
    return ["run", *flags, *[word for word in rest[:end] if word not in RUN_FLAGS], *rest[end:]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localllm", description="Run language models locally.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler, help: str, aliases=()):
        sub = commands.add_parser(name, help=help, description=help, aliases=list(aliases))
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", cmd_serve,
                    "start the OpenAI- and Ollama-compatible server (LOCALLLM_HOST, default 127.0.0.1:11434); "
                    "SIGTERM lets in-flight requests finish for LOCALLLM_SHUTDOWN_GRACE seconds (default 10)")
    serve.add_argument("--gateway", metavar="FILE",
                       help="a gateway config (TOML: upstreams incl. Anthropic-format ones, routes, cache, budgets "
                            "per API key); default: LOCALLLM_GATEWAY")
    serve.add_argument("--ray", action="store_true",
                       help="serve with Ray Serve: autoscaled replicas on the Ray cluster this machine belongs to "
                            "(RAY_ADDRESS, `ray start`, else a new local one) behind a prefix-cache router "
                            "(pip install 'localllm[ray]'; deploy/ray/serve_config.yaml for `serve run`)")
    usage = command("usage", cmd_usage, "tokens and cost per route and model, and the budgets' spend, from the "
                                        "running server's /metrics")
    usage.add_argument("--json", action="store_true", help='print {"routes": [...], "budgets": [...]} as JSON')
    run = command("run", cmd_run, "chat with a model (pulled first when missing)")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*", help="a one-shot prompt; without it, an interactive chat")
    think = run.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_const", const=True, default=None,
                       help="reasoning models: think before answering (default: the model's)")
    think.add_argument("--no-think", dest="think", action="store_const", const=False,
                       help="reasoning models: answer without thinking")
    run.add_argument("--hide-thinking", action="store_true", help="do not print the thought, only the answer")
    pull = command("pull", cmd_pull, "fetch a model into the store")
    pull.add_argument("model")
    command("list", cmd_list, "list stored models", aliases=["ls"])
    show = command("show", cmd_show, "show a model's details")
    show.add_argument("model")
    for flag in ("modelfile", "parameters", "template", "system", "license"):
        show.add_argument(f"--{flag}", action="store_true", help=f"print only the {flag}")
    cp = command("cp", cmd_cp, "copy a model under another name (an alias sharing its files)")
    cp.add_argument("source")
    cp.add_argument("destination")
    rm = command("rm", cmd_rm, "remove models")
    rm.add_argument("models", nargs="+")
    create = command("create", cmd_create, "create a model from a Modelfile")
    create.add_argument("model")
    create.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default: ./Modelfile)")
    create.add_argument("-q", "--quantize", metavar="TYPE",
                        help="convert FROM a Hugging Face folder to a GGUF of this type: q8_0, q4_0, q4_1, q5_0, "
                             "q5_1")
    warmup = command("warmup", cmd_warmup, "compile a model's kernels ahead of its first answer (cached on disk)")
    warmup.add_argument("models", nargs="+")
    command("ps", cmd_ps, "list models loaded by the running server")
    stop = command("stop", cmd_stop, "unload a model from the running server")
    stop.add_argument("model")
    return parser


# ---- store commands ----------------------------------------------------------------------------------

def cmd_pull(args) -> int:
    progress = TqdmPullProgress(file=sys.stderr)
    try:
        if server_available():
            for event in server_stream("/api/pull", {"model": args.model, "stream": True}):
                progress(event)
        else:
            ModelStore().pull(args.model, progress=progress)
    finally:
        progress.close()
    return 0


def cmd_list(args) -> int:
    if server_available():
        rows = [(m["name"], short_id(m.get("digest", "")), human_bytes(m.get("size", 0)),
                 human_time(datetime.fromisoformat(m["modified_at"])))
                for m in server_request("GET", "/api/tags").get("models") or []]
    else:
        rows = [(e.name, short_id(e.digest), human_bytes(e.size), human_time(e.modified_at))
                for e in ModelStore().list()]
    print(format_table(("NAME", "ID", "SIZE", "MODIFIED"), rows))
    return 0


def cmd_show(args) -> int:
    if server_available():
        shown = server_request("POST", "/api/show", {"model": args.model})
    else:
        entry = ModelStore().get(args.model)
        shown = {"modelfile": render_modelfile(entry), "parameters": format_parameters(entry.parameters),
                 "template": entry.chat_template or "", "system": entry.system or "",
                 "license": entry.license or "", "details": dict(entry.details, format=entry.format),
                 "model_info": entry.model_info, "projector_info": entry.projector_info if entry.projector else {}}
    for field in ("modelfile", "parameters", "template", "system", "license"):
        if getattr(args, field):
            print(shown.get(field) or "", end="" if field == "modelfile" else "\n")
            return 0
    print(describe_model(shown))
    return 0


def cmd_cp(args) -> int:
    if server_available():
        server_request("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    else:
        ModelStore().copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_rm(args) -> int:
    remote = server_available()
    store, status = (None if remote else ModelStore()), 0
    for name in args.models:
        try:
            if remote:
                server_request("DELETE", "/api/delete", {"model": name})
            else:
                store.delete(name)
            print(f"deleted '{name}'")
        except (ModelNotFound, InvalidModelName, CLIError) as exc:
            print(f"Error: {exc}", file=sys.stderr)
            status = 1
    return status


def cmd_create(args) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot read Modelfile {path}: {exc.strerror}") from None
    print("parsing modelfile", file=sys.stderr)
    modelfile = parse_modelfile(text)
    progress = TqdmPullProgress(file=sys.stderr)
    try:
        if server_available():                   # the server converts into its store and unloads the old model
            body = dict(modelfile.create_request(args.model, base_dir=path.parent), stream=True)
            if args.quantize:
                body["quantize"] = args.quantize
            for event in server_stream("/api/create", body):
                progress(event)
        else:
            create_model(ModelStore(), args.model, modelfile, base_dir=path.parent, progress=progress,
                         quantize=args.quantize)
    finally:
        progress.close()
    return 0


# ---- run: one-shot and interactive chat ----------------------------------------------------------------

def cmd_run(args) -> int:
    local_path = is_path_reference(args.model)   # a .gguf file or a Hugging Face folder: run here
    model = RemoteModel.connect(args.model) if server_available() and not local_path else load_in_process(args.model)
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt:
        try:
            stream_reply(model, [user_message(prompt)], {}, sys.stdout, think=args.think,
                         hide_thinking=args.hide_thinking)
        except ValueError as exc:  # the library's precise messages (context exceeded, bad option, no thinking)
            raise CLIError(str(exc)) from None
        return 0
    ChatSession(model, think=args.think, hide_thinking=args.hide_thinking).loop()
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def user_message(text: str) -> dict:
    """A user turn of ``run``: words of ``text`` that name image files (``./photo.jpg``, ``~/cat.png``; a space in
    a name escaped as ``\\ ``) are sent as the message's images, as ``ollama run`` does, and left out of the text.
    A model without vision then says so."""
    import base64
    import re

    images, kept = [], []
    for word in re.split(r"(?<!\\)\s+", text.strip()):
        path = Path(word.replace("\\ ", " ").strip("'\"").rstrip("?!,;:)")).expanduser()   # "... ./cat.png?"
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            images.append(base64.b64encode(path.read_bytes()).decode())
        else:
            kept.append(word)
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": " ".join(kept), "images": images}


def load_in_process(name: str):
    """Pull when missing, then load the model in this process (a path to a .gguf file or HF folder as it is)."""
    import localllm

    if is_path_reference(name):
        model = localllm.load(Path(name).expanduser())
    else:
        progress = TqdmPullProgress(file=sys.stderr)
        try:
            entry = ModelStore().ensure(name, progress=progress)
        finally:
            progress.close()
        model, name = localllm.load(entry), entry.name
    if not hasattr(model, "chat"):
        raise CLIError(f"model '{name}' is an embedding model and does not support chat")
    return model


class RemoteModel:
    """The running server's model, with the one call the CLI needs: ``chat(messages, stream=True, **options)``."""

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def connect(cls, name: str) -> "RemoteModel":
        """Pull through the server when it lacks the model, then load it there."""
        try:
            show = server_request("POST", "/api/show", {"model": name})
        except CLIError as exc:
            if "not found" not in str(exc):
                raise
            progress = TqdmPullProgress(file=sys.stderr)
            try:
                for event in server_stream("/api/pull", {"model": name, "stream": True}):
                    progress(event)
            finally:
                progress.close()
            show = server_request("POST", "/api/show", {"model": name})
        if "completion" not in (show.get("capabilities") or ["completion"]):
            raise CLIError(f"model '{name}' is an embedding model and does not support chat")
        return cls(name)

    def chat(self, messages: list[dict], stream: bool = True, **options):
        for _, content in self.chat_parts(messages, None, options):
            if content:
                yield content

    def chat_parts(self, messages: list[dict], think, options: dict):
        """(thought, answer) pieces of the streamed reply (``think`` as /api/chat takes it; None: the model's)."""
        body = {"model": self.name, "messages": messages, "stream": True, "options": options}
        if think is not None:
            body["think"] = think
        for line in server_stream("/api/chat", body):
            message = line.get("message") or {}
            if message.get("thinking") or message.get("content"):
                yield message.get("thinking") or "", message.get("content") or ""


def reply_parts(model, messages: list[dict], options: dict, think=None):
    """(thought, answer) pieces of a streamed reply: from the server, a loaded model, or any object whose
    ``chat(messages, stream=True, **options)`` yields text (no thought)."""
    if isinstance(model, RemoteModel):
        yield from model.chat_parts(messages, think, options)
        return
    from .api import Model

    if isinstance(model, Model):
        for event in model.chat(messages, stream=True, details=True, think=think, **options):
            if event.thinking or event.text:
                yield event.thinking, event.text
    else:
        for piece in model.chat(messages, stream=True, **options):
            yield "", piece


THINKING_START, THINKING_END = "Thinking...\n", "\n...done thinking.\n\n"


def stream_reply(model, messages: list[dict], options: dict, out, think=None, hide_thinking: bool = False) -> str:
    """Print the model's reply as it streams (a thought between "Thinking..." and "...done thinking.",
    unless ``hide_thinking``); returns the answer."""
    pieces = []
    thinking_open = False
    for thought, content in reply_parts(model, messages, options, think):
        if thought and not hide_thinking:
            if not thinking_open:
                out.write(THINKING_START)
                thinking_open = True
            out.write(thought)
        if content:
            if thinking_open:
                out.write(THINKING_END)
                thinking_open = False
            pieces.append(content)
            out.write(content)
        out.flush()
    if thinking_open:
        out.write(THINKING_END)
    out.write("\n")
    return "".join(pieces)


class ChatSession:
    """An interactive chat that keeps the conversation; ``/?`` lists the commands."""

    def __init__(self, model, input_fn=input, out=None, err=None, think=None, hide_thinking: bool = False):
        self.model = model
        self.think = think
        self.hide_thinking = hide_thinking
        self.input = input_fn
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.messages: list[dict] = []
        self.options: dict = {}
        self.system: str | None = None

    def loop(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                line = self.read_message()
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:
                self.out.write("\nUse Ctrl + d or /bye to exit.\n")
                continue
            if line is None:
                return
            if line.strip():
                self.handle(line)

    def read_message(self) -> str | None:
        """The next message (multi-line between triple quotes), or None after ``/bye``."""
        line = self.input(">>> ")
        if line.strip() == "/bye":
            return None
        if line.lstrip().startswith('"""'):
            text = line.lstrip()[3:]
            while not text.rstrip().endswith('"""'):
                text += "\n" + self.input("... ")
            return text.rstrip()[:-3]
        return line

    def handle(self, line: str) -> None:
        """One user line: a slash command, or a message to answer."""
        if line.startswith("/"):
            self.command(line)
            return
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        history.append(user_message(line))
        try:
            reply = stream_reply(self.model, history, self.options, self.out, think=self.think,
                                 hide_thinking=self.hide_thinking)
        except KeyboardInterrupt:
            self.out.write("\n")
            return
        except ValueError as exc:
            print(f"Error: {exc}", file=self.err)
            return
        self.messages += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
        self.out.write("\n")

    def command(self, line: str) -> None:
        words = line.split()
        if words[0] in ("/?", "/help"):
            print(CHAT_HELP, file=self.out)
        elif words[0] == "/clear":
            self.messages = []
            print("Cleared session context", file=self.out)
        elif words[:2] == ["/set", "parameter"] and len(words) >= 4:
            self.set_parameter(words[2], words[3:])
        elif words[:2] == ["/set", "system"] and len(words) >= 3:
            self.system = line.split(None, 2)[2]
            print("Set system message.", file=self.out)
        elif words[:2] in (["/set", "think"], ["/set", "nothink"]):
            self.think = words[1] == "think"
            print(f"Set '{words[1]}' mode.", file=self.out)
        elif words[:2] == ["/show", "parameters"]:
            print(format_parameters(self.options) or "No parameters set.", file=self.out)
        else:
            print(f"Unknown command '{line}'. Type /? for help", file=self.out)

    def set_parameter(self, name: str, values: list[str]) -> None:
        try:
            if name in LIST_PARAMETERS:
                value = [parse_parameter(name, v) for v in values]
            else:
                value = parse_parameter(name, " ".join(values))
        except ModelfileError as exc:
            print(f"Error: {exc}", file=self.err)
            return
        self.options[name] = value
        print(f"Set parameter '{name}' to '{', '.join(map(str, value)) if isinstance(value, list) else value}'",
              file=self.out)


# ---- server commands ---------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    """Serve until SIGTERM or Ctrl-C; in-flight requests get LOCALLLM_SHUTDOWN_GRACE seconds, then exit 0."""
    if not module_exists("localllm_server.app"):
        return not_available("serve")
    from localllm_server.app import Settings
    from localllm_server.server import serve

    from .engine import EngineSettings
    if getattr(args, "gateway", None):
        os.environ["LOCALLLM_GATEWAY"] = args.gateway
    try:
        settings = Settings.from_env()
        EngineSettings()                          # its environment variables checked before binding
        if module_exists("localllm_server.gateway"):
            from localllm_server.gateway import load_from_env
            load_from_env()                       # the gateway file checked before binding (GatewayConfigError)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if getattr(args, "ray", False):
        if not module_exists("ray.serve"):
            raise CLIError("--ray needs Ray Serve: pip install 'localllm[ray]'")
        from localllm_server.ray_serve import serve_with_ray
        serve_with_ray(settings)
        return 0
    serve(settings)
    return 0


USAGE_METRICS = {"localllm_gateway_requests_total": "requests", "localllm_gateway_prompt_tokens_total": "prompt",
                 "localllm_gateway_completion_tokens_total": "completion", "localllm_gateway_cost_total": "cost"}
BUDGET_METRICS = {"localllm_gateway_budget_spent_tokens": "tokens", "localllm_gateway_budget_spent_cost": "cost",
                  "localllm_gateway_budget_max_tokens": "max_tokens", "localllm_gateway_budget_max_cost": "max_cost",
                  "localllm_gateway_budget_refused_total": "refused"}
_LABEL = r'"((?:[^"\\]|\\.)*)"'


def _unescape_label(label: str) -> str:
    """A Prometheus label value with its escapes (\\\\ \\" \\n) undone."""
    import re

    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), label)


def usage_rows(metrics_text: str) -> list[dict]:
    """The gateway's accounting in a /metrics text: one row per (route, model), sorted."""
    import re

    sample = re.compile(rf"^(\w+)\{{route={_LABEL},model={_LABEL}\}} (\S+)$")
    rows: dict[tuple[str, str], dict] = {}
    for line in metrics_text.splitlines():
        match = sample.match(line)
        if match is None or match.group(1) not in USAGE_METRICS:
            continue
        name, route, model, value = match.groups()
        key = (_unescape_label(route), _unescape_label(model))
        row = rows.setdefault(key, {"route": key[0], "model": key[1], "requests": 0, "prompt": 0, "completion": 0,
                                    "cost": 0.0})
        row[USAGE_METRICS[name]] = float(value) if USAGE_METRICS[name] == "cost" else int(float(value))
    return [rows[key] for key in sorted(rows)]


def budget_rows(metrics_text: str) -> list[dict]:
    """The gateway's budgets in a /metrics text, in the config's order: the tokens and cost spent in the current
    period, the limits (None: not limited), the requests refused since the server started."""
    import re

    sample = re.compile(rf"^(\w+)\{{budget={_LABEL},period={_LABEL}\}} (\S+)$")
    rows: dict[str, dict] = {}
    for line in metrics_text.splitlines():
        match = sample.match(line)
        if match is None or match.group(1) not in BUDGET_METRICS:
            continue
        name, budget, period, value = match.groups()
        budget = _unescape_label(budget)
        row = rows.setdefault(budget, {"budget": budget, "period": _unescape_label(period), "tokens": 0,
                                       "cost": 0.0, "max_tokens": None, "max_cost": None, "refused": 0})
        field = BUDGET_METRICS[name]
        row[field] = float(value) if field in ("cost", "max_cost") else int(float(value))
    return list(rows.values())


def cmd_usage(args) -> int:
    """Tokens and cost per route and model since the server started (its /metrics), with a total line; then
    each budget's spend in its current period against its limits."""
    with _open("GET", "/metrics", None, timeout=30) as response:
        text = response.read().decode("utf-8")
    rows, budgets = usage_rows(text), budget_rows(text)
    if args.json:
        print(json.dumps({"routes": rows, "budgets": budgets}, indent=2))
        return 0
    if not rows and not budgets:
        print("no gateway usage yet (the server counts it when started with a gateway config)")
        return 0
    if rows:
        total = {"route": "TOTAL", "model": "", **{key: sum(row[key] for row in rows)
                                                    for key in ("requests", "prompt", "completion", "cost")}}
        table = [[row["route"], row["model"], str(row["requests"]), str(row["prompt"]), str(row["completion"]),
                  f"{row['cost']:.6f}"] for row in [*rows, total]]
        print(format_table(("ROUTE", "MODEL", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "COST"), table))
    if budgets:
        def spent(value: str, limit: str | None) -> str:
            return f"{value} of {limit}" if limit is not None else value
        table = [[row["budget"], row["period"],
                  spent(str(row["tokens"]), None if row["max_tokens"] is None else str(row["max_tokens"])),
                  spent(f"{row['cost']:.6f}", None if row["max_cost"] is None else f"{row['max_cost']:g}"),
                  str(row["refused"])] for row in budgets]
        print(("\n" if rows else "") + format_table(("BUDGET", "PERIOD", "TOKENS", "COST", "REFUSED"), table))
    return 0


def cmd_warmup(args) -> int:
    """Run each model's two forward paths once (the one-launch decode step, the per-op prefill), so that their
    kernels are compiled into the kernel cache before a first request waits for them."""
    import time

    import numpy as np

    for name in args.models:
        model = load_in_process(name)
        network = model.network
        cache = network.new_cache(1, 64)
        timings = []
        for what, n in (("decode step", 1), ("prefill", 24)):   # 24 > the one-launch step's largest batch
            started = time.perf_counter()
            network.forward(np.arange(1, n + 1) % network.config.vocab_size, np.arange(n), np.zeros(n, np.int64),
                            cache, logits_for=[n - 1])
            timings.append(f"{what} {time.perf_counter() - started:.1f} s")
        print(f"{model.name}: ready ({', '.join(timings)})")
    return 0


def cmd_ps(args) -> int:
    if not module_exists("localllm_server.app"):
        return not_available("ps")
    rows = []
    for model in server_request("GET", "/api/ps").get("models") or []:
        until = model.get("expires_at")
        rows.append((model["name"], short_id(model.get("digest", "")), human_bytes(model.get("size", 0)),
                     human_until(datetime.fromisoformat(until)) if until else ""))
    print(format_table(("NAME", "ID", "SIZE", "UNTIL"), rows))
    return 0


def cmd_stop(args) -> int:
    if not module_exists("localllm_server.app"):
        return not_available("stop")
    server_request("POST", "/api/generate", {"model": args.model, "keep_alive": 0})
    return 0


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def not_available(command: str) -> int:
    print(f"localllm {command}: not available yet", file=sys.stderr)
    return 2


def server_url() -> str:
    from localllm_server.app import parse_host

    host, port = parse_host(os.environ.get("LOCALLLM_HOST", ""))
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


_server_available: bool | None = None


def server_available() -> bool:
    """Whether a localllm (or Ollama) server answers at LOCALLLM_HOST; asked once per command."""
    global _server_available
    if _server_available is None:
        if not module_exists("localllm_server.app"):
            _server_available = False
            return False
        try:
            with urllib.request.urlopen(server_url() + "/api/version", timeout=0.5) as response:
                _server_available = "version" in json.loads(response.read() or b"{}")
        except (OSError, ValueError):
            _server_available = False
    return _server_available


def _open(method: str, path: str, body: dict | None, timeout: float):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server_url() + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    api_key = os.environ.get("LOCALLLM_API_KEY")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error")
        except ValueError:
            message = None
        raise CLIError(message if isinstance(message, str) else f"HTTP {exc.code} from {server_url()}") from None
    except urllib.error.URLError as exc:
        raise CLIError(f"could not connect to localllm at {server_url()} ({exc.reason}); "
                       f"is `localllm serve` running?") from None


def server_stream(path: str, body: dict):
    """The NDJSON lines of a streamed server response, as dicts; an in-stream error becomes a CLIError."""
    with _open("POST", path, body, timeout=600) as response:
        for raw in response:
            if not raw.strip():
                continue
            line = json.loads(raw)
            if "error" in line:
                raise CLIError(line["error"])
            yield line


def server_request(method: str, path: str, body: dict | None = None) -> dict:
    """JSON from the running server; a CLIError naming the address when it is not reachable."""
    with _open(method, path, body, timeout=30) as response:
        text = response.read().decode("utf-8").strip().splitlines()
    return json.loads(text[-1]) if text else {}


# ---- formatting --------------------------------------------------------------------------------------

def short_id(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def human_bytes(size: int) -> str:
    """Sizes as ollama prints them: 98362432 -> '98 MB', 1500 -> '1.5 KB'."""
    for unit, scale in (("GB", 1000 ** 3), ("MB", 1000 ** 2), ("KB", 1000)):
        if size >= scale:
            value = size / scale
            return f"{int(value)} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def human_time(when: datetime, now: datetime | None = None) -> str:
    """'Less than a second ago', 'About a minute ago', '3 hours ago', '2 weeks ago'..."""
    seconds = int(((now or datetime.now(when.tzinfo)) - when).total_seconds())
    return _human_duration(seconds) + " ago" if seconds >= 1 else "Less than a second ago"


def human_until(when: datetime, now: datetime | None = None) -> str:
    seconds = int((when - (now or datetime.now(when.tzinfo))).total_seconds())
    return "Stopping..." if seconds < 1 else _human_duration(seconds) + " from now"


def _human_duration(seconds: int) -> str:
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 60:
        return f"{seconds} second{'s' * (seconds != 1)}"
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if days < 14:
        return f"{days} days"
    if days < 60:
        return f"{days // 7} weeks"
    if days < 730:
        return f"{days // 30} months"
    return f"{days // 365} years"


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def describe_model(shown: dict) -> str:
    """``localllm show NAME``: architecture, size, capabilities, vision projector and defaults in ollama's layout,
    from an /api/show object."""
    from .model_info import human_count

    details, info = shown.get("details") or {}, shown.get("model_info") or {}
    family = details.get("family", "")
    model_rows = [("architecture", family), ("parameters", details.get("parameter_size")),
                  ("context length", info.get(f"{family}.context_length")),
                  ("embedding length", info.get(f"{family}.embedding_length")),
                  ("quantization", details.get("quantization_level")), ("format", details.get("format"))]
    sections = [("Model", [f"{key.ljust(20)}{value}" for key, value in model_rows if value is not None])]
    if shown.get("capabilities"):
        sections.append(("Capabilities", list(shown["capabilities"])))
    projector = shown.get("projector_info") or {}
    if projector:
        kind = projector.get("general.architecture", "clip")
        count = projector.get("general.parameter_count")
        projector_rows = [("architecture", kind),
                          ("parameters", human_count(int(count)) if isinstance(count, (int, float)) else None),
                          ("embedding length", projector.get(f"{kind}.vision.embedding_length")),
                          ("dimensions", projector.get(f"{kind}.vision.projection_dim"))]
        sections.append(("Projector", [f"{key.ljust(20)}{value}" for key, value in projector_rows
                                       if value is not None]))
    for title, field, limit in (("Parameters", "parameters", None), ("System", "system", None),
                                ("License", "license", 2)):
        if shown.get(field):
            sections.append((title, shown[field].splitlines()[:limit]))
    return "\n\n".join(f"  {title}\n" + "\n".join(f"    {line}" for line in lines) for title, lines in sections)


if __name__ == "__main__":
    sys.exit(main())
