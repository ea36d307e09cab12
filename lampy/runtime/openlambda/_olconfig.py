"""A lambda's `ol.yaml`, read the way OpenLambda's worker reads it (go/common/lambdaConfig.go).

OpenLambda decodes `ol.yaml` over its defaults (any HTTP method, no environment, sandboxes
reused), checks it, and answers `GET /registry/<name>/config` with the result as Go's
encoding/json writes it: field names as in the Go struct (`Triggers`, `HTTP`, `Method`...),
compact, HTML-escaped, ending in a newline. `lampy worker` answers the same bytes, and uses the
same fields: the methods a lambda allows, its environment (written to the lambda's `.env`, over
any `.env` in the tarball, as OpenLambda does) and whether a sandbox serves more than one call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

FILENAME = "ol.yaml"
TRUE = {"y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"}
FALSE = {"n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"}


class _Loader(yaml.BaseLoader):  # type: ignore[misc]
    """Every scalar read as its text, but for nulls (`~`, `null`, nothing), as yaml.v3 does
    when decoding into Go strings; a quoted "null" stays a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)
_Loader.add_constructor("tag:yaml.org,2002:null", lambda loader, node: None)


class ConfigError(ValueError):
    """An `ol.yaml` OpenLambda would refuse (its message is OpenLambda's where it can be)."""


@dataclass
class LambdaConfig:
    """OpenLambda's LambdaConfig: None stands for Go's nil (a `null` in the JSON)."""

    http: list[str] | None = field(default_factory=lambda: ["*"])
    cron: list[str] | None = None
    kafka: list[dict[str, Any]] | None = None
    environment: dict[str, str] | None = field(default_factory=dict)
    reuse_sandbox: bool = True

    def allows(self, method: str) -> bool:
        return any(m in ("*", method) for m in self.http or [])

    def to_json(self) -> bytes:
        """The bytes OpenLambda's `GET /registry/<name>/config` answers."""
        document = {
            "Triggers": {
                "HTTP": None if self.http is None else [{"Method": m} for m in self.http],
                "Cron": None if self.cron is None else [{"Schedule": s} for s in self.cron],
                "Kafka": self.kafka,
            },
            "Environment": None
            if self.environment is None
            else dict(sorted(self.environment.items())),
            "ReuseSandbox": self.reuse_sandbox,
        }
        return go_json(document)

    def env_file(self) -> str:
        """The `.env` OpenLambda writes from `environment` (values with blanks quoted)."""
        lines = []
        for key, value in (self.environment or {}).items():
            if any(c in value for c in " \t\n#="):
                escaped = value.replace('"', '\\"')
                lines.append(f'{key}="{escaped}"\n')
            else:
                lines.append(f"{key}={value}\n")
        return "".join(lines)


def go_json(value: Any) -> bytes:
    """`value` as Go's json.Encoder writes it: compact, `<>&` and U+2028/9 escaped, a newline
    (fields in the order given: Go sorts a map's keys, not a struct's)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return (text + "\n").encode()


def parse(text: str | None) -> LambdaConfig:
    """The config of a lambda whose `ol.yaml` reads `text` (None: it has none).

    Scalars are read as their text (yaml.v3 turns `1` into "1" for a string field); keys
    OpenLambda does not know are ignored, as yaml.v3 ignores them.
    """
    config = LambdaConfig()
    if text is None:
        return config
    try:
        document = yaml.load(text, Loader=_Loader)  # builds strings and nulls only
    except yaml.YAMLError as exc:
        raise ConfigError(f"failed to parse {FILENAME}: yaml: {_one_line(exc)}") from None
    if document is None:
        return config
    top = _mapping(document, "common.LambdaConfig")
    if "triggers" in top and top["triggers"] is not None:
        triggers = _mapping(top["triggers"], "common.Triggers")
        if "http" in triggers:
            config.http = _items(triggers["http"], "method", "common.HTTPTrigger")
        if "cron" in triggers:
            config.cron = _items(triggers["cron"], "schedule", "common.CronTrigger")
        if "kafka" in triggers:
            config.kafka = _kafka(triggers["kafka"])
    if "environment" in top:
        env = top["environment"]
        config.environment = None if env is None else dict(config.environment or {})
        if env is not None:
            for key, value in _mapping(env, "map[string]string").items():
                config.environment[str(key)] = _scalar(value, "string")  # type: ignore[index]
    if "reuse-sandbox" in top and top["reuse-sandbox"] is not None:
        flag = _scalar(top["reuse-sandbox"], "bool")
        if flag not in TRUE | FALSE:
            raise _unmarshal(f"cannot unmarshal !!str `{flag}` into bool")
        config.reuse_sandbox = flag in TRUE
    check(config)
    return config


def check(config: LambdaConfig) -> None:
    """OpenLambda's checkLambdaConfig, with its messages."""
    if any(m == "" for m in config.http or []):
        raise ConfigError("HTTP trigger method cannot be empty")
    if any(s == "" for s in config.cron or []):
        raise ConfigError("Cron trigger schedule cannot be empty")
    for trigger in config.kafka or []:
        if not trigger["topics"]:
            raise ConfigError("Kafka trigger must have at least one topic")
        if not trigger["bootstrap_servers"]:
            raise ConfigError("Kafka trigger must specify at least one bootstrap server")
    for key in config.environment or {}:
        if key == "":
            raise ConfigError("Environment variable key cannot be empty")
        if "=" in key:
            raise ConfigError(f"Environment variable key '{key}' cannot contain '='")


def _one_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def _unmarshal(why: str) -> ConfigError:
    return ConfigError(f"failed to parse {FILENAME}: yaml: unmarshal errors:\n  {why}")


def _kind(value: Any) -> str:
    return "!!seq" if isinstance(value, list) else "!!map" if isinstance(value, dict) else "!!str"


def _mapping(value: Any, go_type: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _unmarshal(f"cannot unmarshal {_kind(value)} into {go_type}")
    return value


def _scalar(value: Any, go_type: str) -> str:
    if not isinstance(value, str):
        raise _unmarshal(f"cannot unmarshal {_kind(value)} into {go_type}")
    return value


def _items(value: Any, key: str, go_type: str) -> list[str] | None:
    """A list of one-key triggers (`- method: GET`), None for `null`."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _unmarshal(f"cannot unmarshal {_kind(value)} into []{go_type}")
    out = []
    for item in value:
        entry = _mapping(item, go_type) if item is not None else {}
        found = entry.get(key)
        out.append("" if found is None else _scalar(found, "string"))
    return out


def _kafka(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _unmarshal(f"cannot unmarshal {_kind(value)} into []common.KafkaTrigger")
    out = []
    for item in value:
        entry = _mapping(item or {}, "common.KafkaTrigger")
        lists = {}
        for key in ("bootstrap_servers", "topics"):
            found = entry.get(key)
            if found is not None and not isinstance(found, list):
                raise _unmarshal(f"cannot unmarshal {_kind(found)} into []string")
            lists[key] = None if found is None else [_scalar(x, "string") for x in found]
        offset = entry.get("auto_offset_reset")
        out.append({**lists, "auto_offset_reset": "" if offset is None else str(offset)})
    return out
