"""The gateway's configuration: a TOML file of upstreams, routes, the response cache and budgets.

```toml
[upstreams.hosted]                       # requests name its models "hosted/<model>"
base_url = "https://api.example.com/v1"  # OpenAI-compatible: <base_url>/chat/completions ...
api_key_env = "HOSTED_API_KEY"           # the key is read from this variable, never written here
connect_timeout = 5                      # seconds (default 5)
read_timeout = 120                       # seconds between two bytes of the answer (default 120)
input_price_per_million = 0.40           # cost of 1M prompt tokens (default 0)
output_price_per_million = 1.60          # cost of 1M completion tokens (default 0)
models = { "fast" = "fast-2025-04-14" }  # name clients use -> the upstream's name (or a list: same names)

[upstreams.claude]                       # an Anthropic-compatible provider: <base_url>/v1/messages
format = "anthropic"                     # "openai" (the default) or "anthropic"
base_url = "https://api.anthropic.com"   # as the Anthropic SDK takes it (without /v1)
api_key_env = "ANTHROPIC_API_KEY"        # sent as x-api-key
anthropic_version = "2023-06-01"         # the anthropic-version header (this default)
default_max_tokens = 4096                # max_tokens when a chat request sets none (Anthropic requires one)
models = { "sonnet" = "claude-sonnet-4-5" }

[routes]
cheap-then-smart = ["smollm2:135m", "hosted/fast"]      # tried in order

[routes.strict-json]                     # the long form: fall back when a local answer breaks its schema
members = ["smollm2:135m", "hosted/fast"]
fallback_on_invalid_json = true

[cache]
enabled = true
max_bytes = 16_000_000
ttl_seconds = 600

[budgets.team-a]                         # a spend limit for the clients sending one API key
key_env = "TEAM_A_KEY"                   # the key (Bearer or x-api-key) is this variable's value; or
                                         # key_sha256 = "<hex>" (the key's SHA-256), or other_keys = true
                                         # (every request whose key is in no other budget, or that sends none)
max_cost = 5.0                           # in the currency of the prices, per period
max_tokens = 2_000_000                   # prompt + completion tokens, per period (one of the two at least)
period = "day"                           # "hour", "day" or "month" (UTC; the default "day")
```

Every mistake is a :class:`GatewayConfigError` naming the file, the key and what is wrong.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 120.0
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
DEFAULT_CACHE_TTL = 600.0
ENV_VARIABLE = "LOCALLLM_GATEWAY"
FORMATS = ("openai", "anthropic")
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_ANTHROPIC_MAX_TOKENS = 4096
PERIODS = ("hour", "day", "month")


class GatewayConfigError(ValueError):
    """A gateway file that cannot be used: ``<file>: <key>: <what is wrong>``."""

    def __init__(self, path: str, key: str, problem: str):
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")
        self.path, self.key, self.problem = path, key, problem


@dataclass(frozen=True)
class Upstream:
    """A provider speaking OpenAI's API (``format`` "openai": ``<base_url>/chat/completions`` ...) or Anthropic's
    Messages API ("anthropic": ``<base_url>/v1/messages``). ``api_key`` comes from ``api_key_env``; it is left
    out of ``repr``."""

    name: str
    base_url: str                               # without the trailing slash: ".../v1" (openai), "..." (anthropic)
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    models: dict[str, str] = field(default_factory=dict)     # gateway name -> the upstream's model name
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    input_price_per_million: float = 0.0
    output_price_per_million: float = 0.0
    format: str = "openai"
    anthropic_version: str = DEFAULT_ANTHROPIC_VERSION
    default_max_tokens: int = DEFAULT_ANTHROPIC_MAX_TOKENS

    @property
    def is_anthropic(self) -> bool:
        return self.format == "anthropic"

    def upstream_model(self, model: str) -> str:
        """The name the upstream knows ``model`` by (the mapping's, else the name itself)."""
        return self.models.get(model, model)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_price_per_million
                + completion_tokens * self.output_price_per_million) / 1e6


@dataclass(frozen=True)
class Route:
    """An ordered fallback chain of members (local model names or ``upstream/model``)."""

    name: str
    members: tuple[str, ...]
    fallback_on_invalid_json: bool = False


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = False
    max_bytes: int = DEFAULT_CACHE_BYTES
    ttl_seconds: float = DEFAULT_CACHE_TTL


@dataclass(frozen=True)
class BudgetConfig:
    """A spend limit per period for the requests sending one API key. The key itself is not kept: only its
    SHA-256 (``key_digest``); ``other_keys``: the budget of every request whose key is in no other budget."""

    name: str
    key_digest: bytes | None = field(default=None, repr=False)
    other_keys: bool = False
    max_cost: float | None = None
    max_tokens: int | None = None
    period: str = "day"


@dataclass(frozen=True)
class GatewayConfig:
    path: str = "<none>"
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    cache: CacheConfig = field(default_factory=CacheConfig)
    budgets: dict[str, BudgetConfig] = field(default_factory=dict)

    def secrets(self) -> list[str]:
        """The upstream keys in use (for scrubbing them out of any text that leaves the server)."""
        return [u.api_key for u in self.upstreams.values() if u.api_key]


def load(path: str | os.PathLike, environ=None) -> GatewayConfig:
    """Read and check the gateway file at ``path`` (keys from ``environ``, default ``os.environ``)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise GatewayConfigError(path, "", "no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise GatewayConfigError(path, "", f"not valid TOML: {exc}") from None
    return parse(data, path, os.environ if environ is None else environ)


def load_from_env(environ=None) -> GatewayConfig | None:
    """The file named by ``LOCALLLM_GATEWAY``, or None when the variable is unset or empty."""
    environ = os.environ if environ is None else environ
    path = environ.get(ENV_VARIABLE, "").strip()
    return load(path, environ) if path else None


def parse(data: dict, path: str = "<gateway>", environ=None) -> GatewayConfig:
    """A GatewayConfig from the parsed TOML document ``data``."""
    environ = os.environ if environ is None else environ
    _only_keys(data, {"upstreams", "routes", "cache", "budgets"}, path, "")
    upstreams = {name: _upstream(name, value, path, environ)
                 for name, value in _table(data, "upstreams", path, "upstreams").items()}
    routes = {name: _route(name, value, path, upstreams)
              for name, value in _table(data, "routes", path, "routes").items()}
    for name in routes:
        if name in upstreams:
            raise GatewayConfigError(path, f"routes.{name}", f"'{name}' is also an upstream's name")
        for member in routes[name].members:
            if member in routes:
                raise GatewayConfigError(path, f"routes.{name}", f"member '{member}' is a route: routes do not nest")
    budgets = _budgets(_table(data, "budgets", path, "budgets"), path, environ)
    return GatewayConfig(path, upstreams, routes, _cache(_table(data, "cache", path, "cache"), path), budgets)


def _table(data: dict, key: str, path: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise GatewayConfigError(path, where, f"must be a table, got {type(value).__name__}")
    return value


def _only_keys(table: dict, allowed: set[str], path: str, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise GatewayConfigError(path, f"{where}.{key}" if where else key,
                                     f"unknown key (expected one of: {', '.join(sorted(allowed))})")


def _number(table: dict, key: str, default: float, path: str, where: str, positive: bool) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GatewayConfigError(path, f"{where}.{key}", f"must be a number, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise GatewayConfigError(path, f"{where}.{key}", f"must be {'more than' if positive else 'at least'} 0, "
                                                        f"got {value!r}")
    return float(value)


UPSTREAM_KEYS = {"base_url", "api_key_env", "models", "connect_timeout", "read_timeout",
                 "input_price_per_million", "output_price_per_million", "format", "anthropic_version",
                 "default_max_tokens"}
ANTHROPIC_ONLY_KEYS = ("anthropic_version", "default_max_tokens")


def _upstream(name: str, table, path: str, environ) -> Upstream:
    where = f"upstreams.{name}"
    if not name or "/" in name:
        raise GatewayConfigError(path, where, "an upstream name must be non-empty and without '/'")
    if not isinstance(table, dict):
        raise GatewayConfigError(path, where, f"must be a table, got {type(table).__name__}")
    _only_keys(table, UPSTREAM_KEYS, path, where)
    kind = table.get("format", "openai")
    if kind not in FORMATS:
        raise GatewayConfigError(path, f"{where}.format", f"must be one of {', '.join(map(repr, FORMATS))}, "
                                                          f"got {kind!r}")
    if kind != "anthropic":
        for key in ANTHROPIC_ONLY_KEYS:
            if key in table:
                raise GatewayConfigError(path, f"{where}.{key}", 'only for an upstream with format = "anthropic"')
    base_url = table.get("base_url")
    if not isinstance(base_url, str) or urlsplit(base_url).scheme not in ("http", "https") \
            or not urlsplit(base_url).hostname:
        raise GatewayConfigError(path, f"{where}.base_url", f"must be an http:// or https:// URL, got {base_url!r}")
    if kind == "anthropic" and urlsplit(base_url).path.rstrip("/").endswith("/v1"):
        raise GatewayConfigError(path, f"{where}.base_url", "an anthropic upstream's base_url is the one the "
                                 "Anthropic SDK takes, without /v1 (the gateway posts to <base_url>/v1/messages), "
                                 f"got {base_url!r}")
    version = table.get("anthropic_version", DEFAULT_ANTHROPIC_VERSION)
    if not isinstance(version, str) or not re.fullmatch(r"[\w.-]+", version):
        raise GatewayConfigError(path, f"{where}.anthropic_version", f"must be a version string such as "
                                                                      f"'{DEFAULT_ANTHROPIC_VERSION}', got {version!r}")
    max_tokens = table.get("default_max_tokens", DEFAULT_ANTHROPIC_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise GatewayConfigError(path, f"{where}.default_max_tokens", f"must be a whole number, at least 1, "
                                                                       f"got {max_tokens!r}")
    key_env = table.get("api_key_env")
    api_key = None
    if key_env is not None:
        if not isinstance(key_env, str) or not key_env:
            raise GatewayConfigError(path, f"{where}.api_key_env", "must be the name of an environment variable")
        api_key = environ.get(key_env) or None
        if api_key is None:
            raise GatewayConfigError(path, f"{where}.api_key_env", f"the environment variable {key_env} is not set")
    models = table.get("models", {})
    if isinstance(models, list):
        models = {m: m for m in models}
    if not isinstance(models, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                               for k, v in models.items()):
        raise GatewayConfigError(path, f"{where}.models", "must map model names to the upstream's model names "
                                                          "(strings), or list model names")
    return Upstream(name, base_url.rstrip("/"), key_env, api_key, dict(models),
                    _number(table, "connect_timeout", DEFAULT_CONNECT_TIMEOUT, path, where, positive=True),
                    _number(table, "read_timeout", DEFAULT_READ_TIMEOUT, path, where, positive=True),
                    _number(table, "input_price_per_million", 0.0, path, where, positive=False),
                    _number(table, "output_price_per_million", 0.0, path, where, positive=False),
                    kind, version, max_tokens)


def _route(name: str, value, path: str, upstreams: dict[str, Upstream]) -> Route:
    where = f"routes.{name}"
    invalid_json = False
    if isinstance(value, dict):
        _only_keys(value, {"members", "fallback_on_invalid_json"}, path, where)
        invalid_json = value.get("fallback_on_invalid_json", False)
        if not isinstance(invalid_json, bool):
            raise GatewayConfigError(path, f"{where}.fallback_on_invalid_json", "must be true or false")
        value = value.get("members")
        where += ".members"
    if not isinstance(value, list) or not value or not all(isinstance(m, str) and m for m in value):
        raise GatewayConfigError(path, where, "must be a non-empty list of model names")
    for member in value:
        prefix, slash, model = member.partition("/")
        if slash and prefix in upstreams and not model:
            raise GatewayConfigError(path, where, f"'{member}' names no model of upstream '{prefix}'")
        if member == name:
            raise GatewayConfigError(path, where, "a route cannot be its own member")
    return Route(name, tuple(value), invalid_json)


def _cache(table: dict, path: str) -> CacheConfig:
    _only_keys(table, {"enabled", "max_bytes", "ttl_seconds"}, path, "cache")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise GatewayConfigError(path, "cache.enabled", "must be true or false")
    max_bytes = table.get("max_bytes", DEFAULT_CACHE_BYTES)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise GatewayConfigError(path, "cache.max_bytes", f"must be a whole number of bytes, at least 1, "
                                                          f"got {max_bytes!r}")
    return CacheConfig(enabled, max_bytes, _number(table, "ttl_seconds", DEFAULT_CACHE_TTL, path, "cache",
                                                   positive=True))


BUDGET_KEYS = {"key_env", "key_sha256", "other_keys", "max_cost", "max_tokens", "period"}
KEY_SOURCES = ("key_env", "key_sha256", "other_keys")


def key_digest(key: str) -> bytes:
    """The SHA-256 of an API key, as budgets hold it."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def _budgets(table: dict, path: str, environ) -> dict[str, BudgetConfig]:
    budgets = {name: _budget(name, value, path, environ) for name, value in table.items()}
    seen: dict[bytes, str] = {}
    others = [name for name, budget in budgets.items() if budget.other_keys]
    if len(others) > 1:
        raise GatewayConfigError(path, f"budgets.{others[1]}.other_keys",
                                 f"only one budget may take the other keys ('{others[0]}' does)")
    for name, budget in budgets.items():
        if budget.key_digest is not None:
            if budget.key_digest in seen:               # the key itself is not named: budgets only
                raise GatewayConfigError(path, f"budgets.{name}",
                                         f"has the same key as budget '{seen[budget.key_digest]}'")
            seen[budget.key_digest] = name
    return budgets


def _budget(name: str, table, path: str, environ) -> BudgetConfig:
    where = f"budgets.{name}"
    if not isinstance(table, dict):
        raise GatewayConfigError(path, where, f"must be a table, got {type(table).__name__}")
    _only_keys(table, BUDGET_KEYS, path, where)
    given = [key for key in KEY_SOURCES if key in table]
    if len(given) != 1:
        raise GatewayConfigError(path, where, "needs exactly one of key_env (the variable holding the key), "
                                              "key_sha256 (the key's SHA-256) or other_keys = true")
    digest, other_keys = None, False
    if given == ["key_env"]:
        variable = table["key_env"]
        if not isinstance(variable, str) or not variable:
            raise GatewayConfigError(path, f"{where}.key_env", "must be the name of an environment variable")
        key = environ.get(variable) or None
        if key is None:
            raise GatewayConfigError(path, f"{where}.key_env", f"the environment variable {variable} is not set")
        digest = key_digest(key)
    elif given == ["key_sha256"]:
        value = table["key_sha256"]
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise GatewayConfigError(path, f"{where}.key_sha256", "must be 64 hexadecimal digits (the SHA-256 of "
                                                                   "the key: printf %s KEY | sha256sum)")
        digest = bytes.fromhex(value)
    else:
        if table["other_keys"] is not True:
            raise GatewayConfigError(path, f"{where}.other_keys", "must be true (or left out)")
        other_keys = True
    max_cost = _number(table, "max_cost", 0.0, path, where, positive=False) if "max_cost" in table else None
    max_tokens = table.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 0):
        raise GatewayConfigError(path, f"{where}.max_tokens", f"must be a whole number of tokens, at least 0, "
                                                               f"got {max_tokens!r}")
    if max_cost is None and max_tokens is None:
        raise GatewayConfigError(path, where, "needs max_cost or max_tokens (or both)")
    period = table.get("period", "day")
    if period not in PERIODS:
        raise GatewayConfigError(path, f"{where}.period", f"must be one of {', '.join(map(repr, PERIODS))}, "
                                                           f"got {period!r}")
    return BudgetConfig(name, digest, other_keys, max_cost, max_tokens, period)
