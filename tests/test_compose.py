"""docker-compose.yml, checked without a Docker engine (none runs where Keel is tested).

The file is read as Docker Compose v2 reads it: YAML 1.2 with merge keys and anchors, then
`${VAR}` interpolation (the Compose Specification's rules, as compose-go implements them),
then validation against the Compose Specification's JSON schema (vendored in tests/compose/,
see SOURCE.md). Then the checks the schema cannot make: that what the file names exists (the
services `depends_on` names, named volumes and networks, build contexts, the files mounted
from deploy/), that no host port is published twice, and that the services agree with each
other and with Keel (Prometheus scrapes the port the workers serve metrics on, the workers
send spans to the collector's receiver, the health checks probe the ports Keel listens on,
the codec server allows the Web UI's origin, the image installs what the settings need).

What this cannot tell: whether the images exist and start, whether the containers reach each
other at run time, what the Temporal server, Prometheus or the collector do with their
configuration. `test_real_compose_config` and `test_promtool_check_config` run the real
tools where they are installed, and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_NAME = "docker-compose.yml"
SCHEMA_FILE = Path(__file__).parent / "compose" / "compose-spec.json"
# where the KEEL_* settings the containers get are read
KEEL_SOURCES = [*(ROOT / "keel").glob("*.py"), *(ROOT / "client").glob("*.py")]

# ---------------------------------------------------------------------------------------------
# YAML as compose reads it (yaml.v3: YAML 1.2's core schema, with merge keys)


class ComposeYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core scalars instead of YAML 1.1's: `yes`, `on`
    and `off` stay strings, and so does `22:22` (1.1 reads it as the base-60 number 1342).
    Merge keys (`<<: *anchor`, `<<: [*a, *b]`) work as in compose."""


ComposeYamlLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ComposeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
ComposeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
ComposeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # 010 is ten in YAML 1.2, not eight


ComposeYamlLoader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
    """A key given twice in one mapping is an error in compose (PyYAML keeps the last)."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # merged keys may be overridden, that is what `<<` is for
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"mapping key {key!r} already defined", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_yaml_map(loader, node)


ComposeYamlLoader.add_constructor("tag:yaml.org,2002:map", _mapping_without_duplicates)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ComposeYamlLoader)  # noqa: S506 - a SafeLoader subclass


# ---------------------------------------------------------------------------------------------
# Interpolation: the Compose Specification's 12-interpolation.md, as compose-go's template
# package does it (values only, never keys; nested defaults; `$$` for a literal `$`)


class InterpolationError(ValueError):
    """What compose refuses: a `${...}` it cannot parse, or a required variable unset."""


_NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
_BRACED = re.compile(r"([_a-zA-Z][_a-zA-Z0-9]*)(?:(:?[-+?])(.*))?\Z", re.S)


def interpolate(text: str, env: Mapping[str, str], unset: list[str] | None = None) -> str:
    """`text` with `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`,
    `${VAR?error}`, `${VAR:+other}`, `${VAR+other}` and `$$` replaced as compose does. A
    variable that is unset and has no default becomes "" (compose warns; its name is added
    to `unset`). A `$` that starts none of these stays as it is."""
    out: list[str] = []
    i = 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        after = text[j + 1 : j + 2]
        if after == "$":
            out.append("$")
            i = j + 2
        elif after == "{":
            end = _closing_brace(text, j + 1)
            if end < 0:
                raise InterpolationError(
                    f"invalid interpolation format: {text!r} (no closing brace)"
                )
            out.append(_substitute(text[j + 2 : end], env, unset, text))
            i = end + 1
        elif m := _NAME.match(text, j + 1):
            out.append(_lookup(m.group(), env, unset))
            i = m.end()
        else:
            out.append("$")
            i = j + 1
    out.append(text[i:])
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    """The index of the `}` closing the `{` at `start`, counting nested braces."""
    depth = 0
    for k in range(start, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    return -1


def _lookup(name: str, env: Mapping[str, str], unset: list[str] | None) -> str:
    if name not in env and unset is not None:
        unset.append(name)
    return env.get(name, "")


def _substitute(body: str, env: Mapping[str, str], unset: list[str] | None, whole: str) -> str:
    m = _BRACED.match(body)
    if m is None:
        raise InterpolationError(f"invalid interpolation format: {whole!r} (in ${{{body}}})")
    name, op, arg = m.group(1), m.group(2), m.group(3) or ""
    is_set = name in env
    value = env.get(name, "")
    if op is None:
        return _lookup(name, env, unset)
    if op in (":-", "-"):
        use_default = not is_set or (op == ":-" and value == "")
        return interpolate(arg, env, unset) if use_default else value
    if op in (":?", "?"):
        if not is_set or (op == ":?" and value == ""):
            reason = interpolate(arg, env, unset)
            raise InterpolationError(
                f"required variable {name} is missing a value" + (f": {reason}" if reason else "")
            )
        return value
    # ":+" / "+": the other value when the variable is set (and, with ":", not empty)
    present = is_set and (op == "+" or value != "")
    return interpolate(arg, env, unset) if present else value


def interpolate_tree(node: Any, env: Mapping[str, str], unset: list[str] | None = None) -> Any:
    """Every string value in a parsed compose file interpolated; keys are left as they are."""
    if isinstance(node, str):
        return interpolate(node, env, unset)
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env, unset) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env, unset) for v in node]
    return node


def variables_used(node: Any) -> set[str]:
    """The names of all variables a parsed compose file interpolates."""
    found: set[str] = set()
    if isinstance(node, str):
        unset: list[str] = []

        class Recorder(dict):  # every lookup is "unset", so every default is walked too
            def __contains__(self, key: object) -> bool:
                found.add(str(key))
                return False

        try:
            interpolate(node, Recorder(), unset)
        except InterpolationError:
            pass
        found.update(unset)
    elif isinstance(node, dict):
        for v in node.values():
            found |= variables_used(v)
    elif isinstance(node, list):
        for v in node:
            found |= variables_used(v)
    return found


# ---------------------------------------------------------------------------------------------
# The project: loaded, interpolated, validated, cross-checked


@dataclass
class Project:
    root: Path
    raw: dict[str, Any]  # as parsed, before interpolation
    model: dict[str, Any]  # interpolated
    env: Mapping[str, str]
    unset: list[str] = field(default_factory=list)

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return self.model.get("services") or {}

    def environment(self, service: str) -> dict[str, str]:
        """What the container gets: `KEY: value`, and `KEY:` (no value) passed through from
        the environment only when it is set there, as compose does."""
        declared = self.services[service].get("environment") or {}
        if isinstance(declared, list):
            declared = dict(
                (item.split("=", 1) if "=" in item else (item, None)) for item in declared
            )
        out: dict[str, str] = {}
        for key, value in declared.items():
            if value is None:
                if key in self.env:
                    out[key] = self.env[key]
            else:
                out[key] = _scalar(value)
        return out

    def command(self, service: str) -> list[str]:
        cmd = self.services[service].get("command") or []
        return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_project(root: Path, env: Mapping[str, str] | None = None) -> Project:
    """`root/docker-compose.yml` as compose would see it with only `env` set (and no .env)."""
    env = dict(env or {})
    raw = load_yaml((root / COMPOSE_NAME).read_text())
    unset: list[str] = []
    model = interpolate_tree(raw, env, unset)
    return Project(root=root, raw=raw, model=model, env=env, unset=sorted(set(unset)))


def schema_errors(model: dict[str, Any]) -> list[str]:
    """Where the interpolated file breaks the Compose Specification's schema."""
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    out = []
    for error in sorted(validator.iter_errors(model), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        best = jsonschema.exceptions.best_match([error])
        out.append(f"schema: {where}: {best.message[:300]}")
    return out


def check(root: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem found in `root`'s compose file with `env`: interpolation, the schema,
    and the references and agreements the schema cannot see."""
    try:
        project = load_project(root, env)
    except (InterpolationError, yaml.YAMLError) as e:
        return [f"load: {e}"]
    problems = [
        f"variable {name} is not set and has no default (compose: a blank string)"
        for name in project.unset
    ]
    problems += schema_errors(project.model)
    return problems or reference_problems(project)  # references: only in a valid file


# ---------------------------------------------------------------------------------------------
# The checks the schema cannot make


def reference_problems(p: Project) -> list[str]:
    out: list[str] = []
    out += _merge_keys_resolved(p.model)
    out += _images_and_builds(p)
    out += _depends_on(p)
    out += _volumes_networks_files(p)
    out += _ports(p)
    out += _keel_settings_exist(p)
    out += _health_ports(p)
    out += _prometheus(p)
    out += _collector(p)
    out += _codec(p)
    out += _image_extras(p)
    out += _env_example(p)
    return out


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")


def _merge_keys_resolved(model: dict[str, Any]) -> list[str]:
    return [
        f"{path or '/'}: a merge key `<<` was not resolved"
        for path, k, _ in _walk(model)
        if k == "<<"
    ]


def _profiles(svc: dict[str, Any]) -> list[str]:
    return list(svc.get("profiles") or [])


def _images_and_builds(p: Project) -> list[str]:
    out = []
    for name, svc in p.services.items():
        if not svc.get("image") and not svc.get("build"):
            out.append(f"service {name}: neither an image nor a build")
        build = svc.get("build")
        if build:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            if not (p.root / context).is_dir():
                out.append(f"service {name}: build context {context} does not exist")
            elif not (p.root / context / dockerfile).is_file():
                out.append(f"service {name}: {context}/{dockerfile} does not exist")
        extends = svc.get("extends")
        if extends:
            base = extends if isinstance(extends, str) else extends.get("service")
            other = None if isinstance(extends, str) else extends.get("file")
            if other:
                if not (p.root / other).is_file():
                    out.append(f"service {name}: extends a file {other} that does not exist")
            elif base not in p.services:
                out.append(f"service {name}: extends {base}, which is not a service")
    return out


def _depends_on(p: Project) -> list[str]:
    out = []
    for name, svc in p.services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            if target not in p.services:
                out.append(f"service {name} depends on {target}, which is not a service")
                continue
            other = p.services[target]
            if (
                not _profiles(svc)
                and _profiles(other)
                and (spec or {}).get("required", True) is not False
            ):
                out.append(
                    f"service {name} runs without a profile but depends on {target}, which "
                    f"runs only with the profile {_profiles(other)}"
                )
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy" and not other.get("healthcheck"):
                out.append(
                    f"service {name} waits for {target} to be healthy; it has no healthcheck"
                )
            if condition == "service_completed_successfully" and other.get("restart") not in (
                None,
                "no",
            ):
                out.append(f"service {name} waits for {target} to complete; it restarts instead")
    return out


def _is_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _volumes_networks_files(p: Project) -> list[str]:
    out = []
    named_volumes = set((p.model.get("volumes") or {}).keys())
    networks = set((p.model.get("networks") or {}).keys()) | {"default"}
    top_configs = p.model.get("configs") or {}
    top_secrets = p.model.get("secrets") or {}
    for kind, top in (("config", top_configs), ("secret", top_secrets)):
        for name, spec in top.items():
            source = (spec or {}).get("file")
            if source and not (p.root / source).exists():
                out.append(f"{kind} {name}: file {source} does not exist")
    for name, svc in p.services.items():
        for volume in svc.get("volumes") or []:
            if isinstance(volume, str):
                parts = volume.split(":")
                source = parts[0] if len(parts) > 1 else ""
            else:
                source = volume.get("source") or ""
            if not source:
                continue  # an anonymous volume
            if _is_path(source):
                if source.startswith("./") or source.startswith("../"):
                    if not (p.root / source).exists():
                        out.append(f"service {name}: mounts {source}, which does not exist")
            elif source not in named_volumes:
                out.append(f"service {name}: volume {source} is not declared under volumes:")
        svc_networks = svc.get("networks") or []
        for net in svc_networks if isinstance(svc_networks, list) else svc_networks.keys():
            if net not in networks:
                out.append(f"service {name}: network {net} is not declared under networks:")
        for kind, top in (("configs", top_configs), ("secrets", top_secrets)):
            for ref in svc.get(kind) or []:
                ref_name = ref if isinstance(ref, str) else ref.get("source")
                if ref_name not in top:
                    out.append(f"service {name}: {kind[:-1]} {ref_name} is not declared")
    return out


@dataclass(frozen=True)
class Published:
    service: str
    host_ip: str
    host_port: int | None
    container_port: int
    protocol: str


def published_ports(p: Project) -> list[Published]:
    out = []
    for name, svc in p.services.items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                published = port.get("published")
                out.append(
                    Published(
                        name,
                        str(port.get("host_ip") or ""),
                        int(published) if published not in (None, "") else None,
                        int(port["target"]),
                        str(port.get("protocol") or "tcp"),
                    )
                )
                continue
            spec, _, protocol = str(port).partition("/")
            parts = spec.rsplit(":", 2)
            container = parts[-1]
            host = parts[-2] if len(parts) > 1 else ""
            ip = parts[0].strip("[]") if len(parts) > 2 else ""
            out.append(
                Published(name, ip, int(host) if host else None, int(container), protocol or "tcp")
            )
    return out


def _ports(p: Project) -> list[str]:
    out = []
    seen: dict[tuple[int, str], list[Published]] = {}
    for port in published_ports(p):
        if port.host_port is None:
            continue
        for other in seen.get((port.host_port, port.protocol), []):
            wildcard = ("", "0.0.0.0", "::")
            if (
                port.host_ip == other.host_ip
                or port.host_ip in wildcard
                or other.host_ip in wildcard
            ):
                out.append(
                    f"host port {port.host_port}/{port.protocol} is published twice: by "
                    f"{other.service} and {port.service}"
                )
        seen.setdefault((port.host_port, port.protocol), []).append(port)
        replicas = (p.services[port.service].get("deploy") or {}).get("replicas", 1)
        if int(replicas) > 1:
            out.append(
                f"service {port.service} runs {replicas} replicas but publishes the fixed host "
                f"port {port.host_port}: only one replica could bind it"
            )
    return out


def _keel_settings_exist(p: Project) -> list[str]:
    """Every KEEL_* variable a service is given is one Keel reads (a typo is silently ignored
    by the container)."""
    readers = [*KEEL_SOURCES, p.root / "Dockerfile", *(p.root / "deploy").glob("*.sh")]
    source = "\n".join(path.read_text() for path in readers if path.is_file())
    out = []
    for name in p.services:
        declared = p.services[name].get("environment") or {}
        keys = declared if isinstance(declared, dict) else [d.split("=", 1)[0] for d in declared]
        for key in keys:
            if key.startswith("KEEL_") and not re.search(rf"\b{key}\b", source):
                out.append(f"service {name}: {key} is not a setting Keel reads")
    return out


_URL_PORT = re.compile(r"https?://(?:127\.0\.0\.1|localhost)(?::(\d+))?")


def _health_ports(p: Project) -> list[str]:
    """The health checks of Keel's services probe the port the process listens on."""
    out = []
    for name, svc in p.services.items():
        test = svc.get("healthcheck", {}).get("test") or []
        text = test if isinstance(test, str) else " ".join(str(t) for t in test)
        m = _URL_PORT.search(text)
        if not m:
            continue
        probed = m.group(1) or "80"
        cmd = p.command(name)
        env = p.environment(name)
        listens: str | None = None
        if cmd[:2] == ["keel", "worker"]:
            listens = env.get("KEEL_WORKER_HEALTH_PORT")
            if env.get("KEEL_WORKER_HEALTH_HOST", "127.0.0.1") not in ("127.0.0.1", "0.0.0.0"):
                out.append(f"service {name}: the health endpoint does not listen on 127.0.0.1")
        elif "--port" in cmd:
            listens = cmd[cmd.index("--port") + 1]
        if listens is not None and listens != probed:
            out.append(
                f"service {name}: the healthcheck probes port {probed}, it listens on {listens}"
            )
    return out


def _service_by_image(p: Project, prefix: str) -> str | None:
    for name, svc in p.services.items():
        if str(svc.get("image", "")).startswith(prefix):
            return name
    return None


def _mounted(p: Project, service: str, target: str) -> Path | None:
    """The file of this project mounted at `target` in `service`."""
    for volume in p.services[service].get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) >= 2 and parts[1] == target and _is_path(parts[0]):
                return p.root / parts[0]
        elif volume.get("target") == target and _is_path(volume.get("source") or ""):
            return p.root / volume["source"]
    return None


def _flag(cmd: list[str], flag: str) -> str | None:
    for i, arg in enumerate(cmd):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def _serves_on(p: Project, service: str, port: int) -> str | None:
    """Why `service` is known to listen on `port` in the compose network (None: it is not)."""
    env = p.environment(service)
    if env.get("KEEL_METRICS_PORT") == str(port):
        if env.get("KEEL_METRICS_HOST") != "0.0.0.0":
            return None  # on loopback only: Prometheus in another container cannot reach it
        return "KEEL_METRICS_PORT"
    endpoint = env.get("PROMETHEUS_ENDPOINT", "")
    if endpoint.endswith(f":{port}") and endpoint.startswith(("0.0.0.0:", ":")):
        return "PROMETHEUS_ENDPOINT"
    if any(pp.container_port == port and pp.service == service for pp in published_ports(p)):
        return "ports"
    return None


def _prometheus(p: Project) -> list[str]:
    name = _service_by_image(p, "prom/prometheus")
    if name is None:
        return ["no prometheus service"]
    config_path = _flag(p.command(name), "--config.file") or "/etc/prometheus/prometheus.yml"
    source = _mounted(p, name, config_path)
    if source is None or not source.is_file():
        return [f"service {name}: nothing from this project is mounted at {config_path}"]
    config = load_yaml(source.read_text())
    out = []
    scraped: set[str] = set()
    by_dns: set[str] = set()  # every replica found, however many `--scale` starts
    for job in config.get("scrape_configs") or []:
        job_name = job.get("job_name")
        targets: list[tuple[str, int]] = []
        for sd in job.get("dns_sd_configs") or []:
            if sd.get("type", "SRV") != "A" or "port" not in sd:
                out.append(f"prometheus job {job_name}: DNS discovery needs type A and a port")
                continue
            for dns_name in sd.get("names") or []:
                targets.append((dns_name.removeprefix("tasks."), int(sd["port"])))
                by_dns.add(dns_name.removeprefix("tasks."))
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host, _, port = str(target).rpartition(":")
                targets.append((host, int(port)))
        for host, port in targets:
            if host == "localhost":
                host = name
            if host not in p.services:
                out.append(f"prometheus job {job_name}: {host} is not a compose service")
                continue
            if host == name:
                if port != 9090:
                    out.append(f"prometheus job {job_name}: Prometheus serves 9090, not {port}")
                continue
            if _serves_on(p, host, port) is None:
                out.append(
                    f"prometheus job {job_name}: service {host} serves no metrics on port {port} "
                    "(reachable from other containers)"
                )
            scraped.add(host)
    for svc in p.services:
        if "KEEL_METRICS_PORT" not in p.environment(svc):
            continue
        if svc not in scraped:
            out.append(f"service {svc} serves metrics that prometheus does not scrape")
        elif svc not in by_dns:
            out.append(
                f"service {svc} can be scaled, but prometheus does not find its replicas by DNS"
            )
    return out


def _collector(p: Project) -> list[str]:
    name = _service_by_image(p, "otel/opentelemetry-collector")
    if name is None:
        return ["no otel-collector service"]
    config_path = _flag(p.command(name), "--config") or "/etc/otelcol-contrib/config.yaml"
    source = _mounted(p, name, config_path)
    if source is None or not source.is_file():
        return [f"service {name}: nothing from this project is mounted at {config_path}"]
    config = load_yaml(source.read_text())
    out = []
    http = (((config.get("receivers") or {}).get("otlp") or {}).get("protocols") or {}).get("http")
    if not isinstance(http, dict) or "endpoint" not in http:
        return [f"{source.name}: no OTLP/HTTP receiver with an endpoint"]
    host, _, port = str(http["endpoint"]).rpartition(":")
    if host not in ("0.0.0.0", ""):
        out.append(f"{source.name}: the OTLP/HTTP receiver listens on {host}, not 0.0.0.0")
    pipelines = (config.get("service") or {}).get("pipelines") or {}
    if "otlp" not in ((pipelines.get("traces") or {}).get("receivers") or []):
        out.append(f"{source.name}: no traces pipeline takes the otlp receiver")
    for pipeline, spec in pipelines.items():
        for section in ("receivers", "processors", "exporters"):
            defined = config.get(section) or {}
            for component in spec.get(section) or []:
                if component not in defined:
                    out.append(
                        f"{source.name}: pipeline {pipeline} uses {component}, not defined under {section}"
                    )
    senders = 0
    for svc in p.services:
        env = p.environment(svc)
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if env.get("KEEL_TRACING") == "otlp" and not endpoint:
            out.append(f"service {svc}: KEEL_TRACING=otlp without OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint:
            continue
        senders += 1
        url = urlsplit(endpoint)
        if url.hostname != name or str(url.port) != port or url.scheme != "http":
            out.append(
                f"service {svc}: sends spans to {endpoint}, but the collector receives "
                f"OTLP/HTTP at http://{name}:{port}"
            )
    if not senders:
        out.append("no service sends spans to the collector")
    return out


def _codec(p: Project) -> list[str]:
    """The Web UI's codec endpoint is the codec server's published port, on the UI's site."""
    ui = _service_by_image(p, "temporalio/ui")
    codec = next((s for s in p.services if "codec-server" in p.command(s)), None)
    if ui is None or codec is None:
        return [] if codec is None else ["a codec server but no Web UI"]
    out = []
    if not _profiles(p.services[codec]):
        out.append(f"service {codec} needs keys: it should run only with a profile")
    endpoint = p.environment(ui).get("TEMPORAL_CODEC_ENDPOINT", "")
    if not endpoint:
        return out
    url = urlsplit(endpoint)
    listens = int(_flag(p.command(codec), "--port") or 8081)
    hosts = {
        pp.host_port
        for pp in published_ports(p)
        if pp.service == codec and pp.container_port == listens
    }
    if url.port not in hosts:
        out.append(
            f"the Web UI calls the codec server at {endpoint}; it is published on {sorted(hosts)}"
        )
    ui_url = urlsplit(p.environment(codec).get("KEEL_UI_URL", "http://localhost:8233"))
    if url.hostname != ui_url.hostname:
        out.append(
            f"the codec server ({url.hostname}) and the Web UI ({ui_url.hostname}) are on "
            "different sites: the browser will not send the codec server's session cookie"
        )
    return out


def _image_extras(p: Project) -> list[str]:
    """A service built from the Dockerfile and given KEEL_TRACING=otlp (or an S3 bucket)
    needs the image to install the extra that makes it work."""
    out = []
    dockerfile = (p.root / "Dockerfile").read_text() if (p.root / "Dockerfile").is_file() else ""
    for name, svc in p.services.items():
        if not svc.get("build"):
            continue
        env = p.environment(name)
        for var, extra in (("KEEL_TRACING", "otel"), ("KEEL_PAYLOAD_S3_BUCKET", "s3")):
            if env.get(var) and f"['{extra}']" not in dockerfile:
                out.append(
                    f"service {name}: {var} is set, but the Dockerfile does not install the {extra} extra"
                )
    return out


def _env_example(p: Project) -> list[str]:
    """deploy/env.example names every variable the file reads from the environment."""
    example = p.root / "deploy" / "env.example"
    if not example.is_file():
        return ["deploy/env.example does not exist"]
    text = example.read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.M))
    wanted = variables_used(p.raw)
    for svc in (p.raw.get("services") or {}).values():
        env = svc.get("environment") or {}
        if isinstance(env, dict):
            wanted |= {k for k, v in env.items() if v is None}  # passed through
    return [f"deploy/env.example does not mention {v}" for v in sorted(wanted - documented)]


# ---------------------------------------------------------------------------------------------
# Tests: interpolation and YAML


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("plain", {}, "plain"),
        ("${A}", {"A": "1"}, "1"),
        ("$A/$B", {"A": "1", "B": "2"}, "1/2"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A:-d}", {"A": "x"}, "x"),
        ("${A-d}", {}, "d"),
        ("${A-d}", {"A": ""}, ""),  # set but empty: no default
        ("${A:?needed}", {"A": "x"}, "x"),
        ("${A?needed}", {"A": ""}, ""),
        ("${A:+yes}", {"A": "x"}, "yes"),
        ("${A:+yes}", {"A": ""}, ""),
        ("${A+yes}", {"A": ""}, "yes"),
        ("${A:-${B:-deep}}", {}, "deep"),
        ("${A:-${B}}", {"B": "b"}, "b"),
        ("${A:-127.0.0.1:7233}:7233", {}, "127.0.0.1:7233:7233"),
        ("${A:-a}${B:-b}", {}, "ab"),
        ('pg -U "$$POSTGRES_USER"', {"POSTGRES_USER": "x"}, 'pg -U "$POSTGRES_USER"'),
        ("costs $5 and $", {}, "costs $5 and $"),  # not a variable: kept
        ("${A:-}", {}, ""),
    ],
)
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("${A:?set A first}", {}, "required variable A is missing a value: set A first"),
        ("${A:?set A first}", {"A": ""}, "set A first"),
        ("${A?}", {}, "required variable A is missing a value"),
        ("${A:-${B:?no B}}", {}, "no B"),  # a nested requirement, reached
        ("${}", {}, "invalid interpolation format"),
        ("${1A}", {}, "invalid interpolation format"),
        ("${A", {}, "no closing brace"),
    ],
)
def test_interpolate_refuses(text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(InterpolationError, match=re.escape(message)):
        interpolate(text, env)


def test_interpolate_notes_unset_variables_and_walks_defaults_lazily() -> None:
    unset: list[str] = []
    assert interpolate("${A}-$B-${C:-x}", {"B": "b"}, unset) == "-b-x"
    assert unset == ["A"]
    assert interpolate("${A:-${B:?no B}}", {"A": "a"}) == "a"  # the default is never read
    assert variables_used({"k": ["${A:-${B}}", "$C", "$$D"], "x": 1}) == {"A", "B", "C"}


def test_yaml_is_read_as_compose_reads_it() -> None:
    doc = load_yaml(
        "x-base: &base {a: 1, b: 2}\n"
        "x-more: &more {c: 3}\n"
        "one: {<<: *base, b: 20}\n"
        "two: {<<: [*base, *more]}\n"
        "plain: [yes, off, 22:22, 010, 0o10, 0x10, 1.5, true, ~]\n"
    )
    assert doc["one"] == {"a": 1, "b": 20}
    assert doc["two"] == {"a": 1, "b": 2, "c": 3}
    assert doc["plain"] == ["yes", "off", "22:22", 10, 8, 16, 1.5, True, None]
    with pytest.raises(yaml.YAMLError, match="mapping key 'a' already defined"):
        load_yaml("a: 1\nb: 2\na: 3\n")


# ---------------------------------------------------------------------------------------------
# Tests: the file itself

# .env values that turn everything on, as deploy/env.example describes them
ENCRYPTION_ENV = {
    "COMPOSE_PROFILES": "encryption",
    "KEEL_ENCRYPTION_KEYS": "k1:" + "A" * 43 + "=",
    "KEEL_CODEC_AUTH_TOKEN": "a-token-of-at-least-16-characters",
    "KEEL_CODEC_URL": "http://localhost:8081",
}


def test_schema_is_the_compose_specification() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize(
    "env",
    [
        {},  # no .env at all: the default stack
        ENCRYPTION_ENV,
        {"KEEL_TRACING": "", "TEMPORAL_BIND": "0.0.0.0:7233", "KEEL_IMAGE": "reg.example/keel:1"},
    ],
    ids=["defaults", "encryption", "overrides"],
)
def test_compose_file_is_valid(env: dict[str, str]) -> None:
    assert check(ROOT, env) == []


def test_the_stack_has_what_the_issue_names() -> None:
    p = load_project(ROOT)
    images = {name: str(svc.get("image", "")) for name, svc in p.services.items()}
    assert images["postgres"].startswith("postgres:")
    assert images["temporal"].startswith("temporalio/auto-setup:")
    assert images["ui"].startswith("temporalio/ui:")
    assert images["prometheus"].startswith("prom/prometheus:")
    assert images["otel-collector"].startswith("otel/opentelemetry-collector-contrib:")
    assert p.command("worker") == ["keel", "worker"]
    assert p.services["worker"]["deploy"]["replicas"] >= 2
    assert "healthcheck" in p.services["worker"]
    assert p.command("codec-server")[:2] == ["keel", "codec-server"]
    assert _profiles(p.services["codec-server"]) == ["encryption"]
    assert p.services["temporal-setup"]["entrypoint"][-1] == "/deploy/temporal-setup.sh"
    assert p.command("api")[:2] == ["keel", "serve"] and _profiles(p.services["api"]) == ["api"]
    # what no profile turns on: everything but the CLI, the codec server and the API
    default = {n for n, s in p.services.items() if not _profiles(s)}
    assert default == set(p.services) - {"keel", "codec-server", "api"}
    # every image is pinned to a version
    for name, image in images.items():
        assert ":" in image and not image.endswith(":latest"), name


def test_workers_keep_payloads_in_the_stacks_s3_store() -> None:
    """The workers and the CLI store large payloads in the minio service's bucket, which
    minio-setup makes before any of them starts, with the credentials minio was given."""
    from keel.config import Settings

    p = load_project(ROOT)
    assert str(p.services["minio"]["image"]).startswith("minio/minio:")
    assert str(p.services["minio-setup"]["image"]).startswith("minio/mc:")
    setup, store = p.environment("minio-setup"), p.environment("minio")
    for name in ("worker", "keel"):
        env = p.environment(name)
        settings = Settings.from_env(env)
        assert settings.stores_payloads and settings.payload_s3_bucket == setup["BUCKET"]
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == store["MINIO_ROOT_USER"] == setup["MINIO_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == store["MINIO_ROOT_PASSWORD"]
        needs = p.services[name]["depends_on"]["minio-setup"]
        assert needs["condition"] == "service_completed_successfully"
    assert 'mc mb --ignore-existing "store/$BUCKET"' in p.services["minio-setup"]["entrypoint"][-1]
    # a bucket of one's own (AWS S3, say) is one setting; no bucket: the shared volume
    own = Settings.from_env(
        load_project(ROOT, {"KEEL_PAYLOAD_S3_BUCKET": "mine"}).environment("worker")
    )
    assert own.payload_s3_bucket == "mine"
    volume = Settings.from_env(
        load_project(ROOT, {"KEEL_PAYLOAD_S3_BUCKET": ""}).environment("worker")
    )
    assert volume.payload_s3_bucket is None and volume.payload_dir == "/data/payloads"


def test_the_setup_job_registers_keels_search_attributes() -> None:
    """temporal-setup creates what workflows/models.py declares (names and types)."""
    from keel.workflows.models import SEARCH_ATTRIBUTES

    script = (ROOT / "deploy" / "temporal-setup.sh").read_text()
    listed = re.search(r'^attributes="([^"]*)"', script, re.M)
    assert listed, "deploy/temporal-setup.sh no longer has its attributes= line"
    registered = dict(spec.split(":") for spec in listed.group(1).split())
    declared = {k.name: k.indexed_value_type.name.title() for k in SEARCH_ATTRIBUTES}
    assert registered == declared


def test_worker_settings_read_from_the_compose_environment() -> None:
    """What the worker container gets parses with Keel's own settings code, as meant."""
    from keel.config import Settings
    from keel.worker import WorkerOptions

    p = load_project(ROOT, ENCRYPTION_ENV)
    env = p.environment("worker")
    settings = Settings.from_env(env)
    assert settings.metrics_port == 9464 and settings.metrics_host == "0.0.0.0"
    assert settings.tracing == "otlp"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert settings.encrypts and settings.address == "temporal:7233"
    assert settings.agents == "keel.demo.agent:AGENTS"
    assert WorkerOptions.from_env(env).health_port == 8080
    # the CLI gets the same keys, the same collector, and no metrics port of its own
    cli = Settings.from_env(p.environment("keel"))
    assert cli.encrypts and cli.tracing == "otlp" and cli.metrics_port is None
    # without a .env: no keys, and KEEL_TRACING= (set, empty) turns spans off
    assert not Settings.from_env(load_project(ROOT).environment("worker")).encrypts
    off = load_project(ROOT, {"KEEL_TRACING": ""}).environment("worker")
    assert Settings.from_env(off).tracing == ""


def test_codec_server_settings_read_from_the_compose_environment() -> None:
    from keel.codec_server import codec_server_from_settings
    from keel.config import Settings

    p = load_project(ROOT, ENCRYPTION_ENV)
    settings = Settings.from_env(p.environment("codec-server"))
    server = codec_server_from_settings(settings, host="0.0.0.0", port=0)  # not started
    ui_port = next(pp.host_port for pp in published_ports(p) if pp.service == "ui")
    assert server.cors_origins == {f"http://localhost:{ui_port}"}
    assert p.environment("ui")["TEMPORAL_CODEC_ENDPOINT"] == "http://localhost:8081"
    assert p.environment("ui")["TEMPORAL_CODEC_INCLUDE_CREDENTIALS"] == "true"
    # without KEEL_CODEC_URL the Web UI is not told about a codec server that is not running
    assert load_project(ROOT).environment("ui")["TEMPORAL_CODEC_ENDPOINT"] == ""


# ---------------------------------------------------------------------------------------------
# Tests: the checks catch what they should (broken copies of the project in tmp_path)


def _copy_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(ROOT / COMPOSE_NAME, root / COMPOSE_NAME)
    shutil.copy(ROOT / "Dockerfile", root / "Dockerfile")
    shutil.copytree(ROOT / "deploy", root / "deploy")
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path.name}: update this test"
    path.write_text(text.replace(old, new, 1))


# fmt: off
BREAKAGES = [
    # (file, old text, new text, a problem that must then be reported)
    (COMPOSE_NAME, "stop_signal: SIGTERM", "stop_signall: SIGTERM", "stop_signall' does not match"),
    (COMPOSE_NAME, "replicas: 2", "replicas: [2]", "schema: services/worker/deploy/replicas"),
    (COMPOSE_NAME, "  temporal-setup:\n    condition:", "  temporal-init:\n    condition:", "temporal-init, which is not a service"),
    (COMPOSE_NAME, "  otel-collector:\n    condition: service_started\n", "  codec-server:\n    condition: service_started\n", "runs only with the profile ['encryption']"),
    (COMPOSE_NAME, "  otel-collector:\n    condition: service_started\n", "  otel-collector:\n    condition: service_healthy\n", "otel-collector to be healthy; it has no healthcheck"),
    (COMPOSE_NAME, "  model:\n    condition: service_healthy\n", "  model:\n    condition: service_healthy\n  model:\n    condition: service_started\n", "mapping key 'model' already defined"),
    (COMPOSE_NAME, "prometheus-data:/prometheus", "prom-data:/prometheus", "volume prom-data is not declared"),
    (COMPOSE_NAME, "./deploy/temporal-setup.sh:", "./deploy/setup.sh:", "mounts ./deploy/setup.sh, which does not exist"),
    (COMPOSE_NAME, "127.0.0.1:9090}:9090", "127.0.0.1:8233}:9090", "host port 8233/tcp is published twice"),
    (COMPOSE_NAME, '-U \\"$$POSTGRES_USER\\"', '-U \\"$POSTGRES_USER\\"', "variable POSTGRES_USER is not set"),
    (COMPOSE_NAME, 'max-size: "10m"', 'max-size: "${LOG_SIZE:?set LOG_SIZE}"', "required variable LOG_SIZE"),
    (COMPOSE_NAME, 'KEEL_METRICS_PORT: "9464"', 'KEEL_METRICS_PORT: "9465"', "worker serves no metrics on port 9464"),
    (COMPOSE_NAME, "KEEL_METRICS_HOST: 0.0.0.0", "KEEL_METRICS_HOST: 127.0.0.1", "worker serves no metrics on port 9464"),
    (COMPOSE_NAME, 'KEEL_WORKER_HEALTH_PORT: "8080"', 'KEEL_WORKER_HEALTH_PORT: "8090"', "probes port 8080, it listens on 8090"),
    (COMPOSE_NAME, "KEEL_WORKER_GRACEFUL_SECONDS:", "KEEL_WORKER_GRACEFULL_SECONDS:", "KEEL_WORKER_GRACEFULL_SECONDS is not a setting Keel reads"),
    (COMPOSE_NAME, "http://otel-collector:4318}", "http://otel-collector:4317}", "sends spans to http://otel-collector:4317"),
    (COMPOSE_NAME, '    profiles: ["encryption"]\n', "", "codec-server needs keys"),
    (COMPOSE_NAME, "      PROMETHEUS_ENDPOINT: 0.0.0.0:8000\n", "", "temporal serves no metrics on port 8000"),
    ("deploy/prometheus.yml", "port: 9464", "port: 9465", "worker serves no metrics on port 9465"),
    ("deploy/prometheus.yml", "names: [worker]", "names: [workers]", "workers is not a compose service"),
    ("deploy/prometheus.yml", "    dns_sd_configs:\n      - names: [worker]\n        type: A\n        port: 9464\n", "    static_configs:\n      - targets: [\"worker:9464\"]\n", "prometheus does not find its replicas by DNS"),
    ("deploy/otel-collector.yaml", "endpoint: 0.0.0.0:4318", "endpoint: 0.0.0.0:4319", "collector receives OTLP/HTTP at http://otel-collector:4319"),
    ("deploy/otel-collector.yaml", "endpoint: 0.0.0.0:4318", "endpoint: localhost:4318", "listens on localhost, not 0.0.0.0"),
    ("deploy/otel-collector.yaml", "exporters: [debug]", "exporters: [debug, otlp/jaeger]", "uses otlp/jaeger, not defined"),
    ("Dockerfile", "['otel']", "", "does not install the otel extra"),
    ("deploy/env.example", "# PROMETHEUS_RETENTION=15d\n", "", "does not mention PROMETHEUS_RETENTION"),
]
# fmt: on


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"), BREAKAGES, ids=[b[3][:40] for b in BREAKAGES]
)
def test_a_broken_copy_is_caught(
    tmp_path: Path, file: str, old: str, new: str, expected: str
) -> None:
    root = _copy_project(tmp_path)
    assert check(root) == []  # the copy itself is fine
    _edit(root / file, old, new)
    problems = check(root)
    assert any(expected in problem for problem in problems), problems


def test_a_missing_config_file_is_caught(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    (root / "deploy" / "prometheus.yml").unlink()
    problems = check(root)
    assert "service prometheus: mounts ./deploy/prometheus.yml, which does not exist" in problems


def test_a_codec_endpoint_on_another_site_is_caught() -> None:
    problems = check(ROOT, {**ENCRYPTION_ENV, "KEEL_CODEC_URL": "http://127.0.0.1:8081"})
    assert any("different sites" in p for p in problems), problems
    problems = check(ROOT, {**ENCRYPTION_ENV, "KEEL_CODEC_URL": "http://localhost:9999"})
    assert any("published on [8081]" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# The real tools, where they are installed (not on Keel's test machines: skipped there)


def _compose_v2() -> list[str] | None:
    candidates = [[os.environ["KEEL_COMPOSE_BIN"]]] if os.environ.get("KEEL_COMPOSE_BIN") else []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            version = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except OSError:
            continue
        if version.lstrip("v").startswith("2."):
            return cmd
    return None


@pytest.mark.parametrize("env", [{}, ENCRYPTION_ENV], ids=["defaults", "encryption"])
def test_real_compose_config(env: dict[str, str]) -> None:
    """`docker compose config` (Compose v2: compose-go's loader and the same schema) accepts
    the file, with no profile and with all of them. It needs no engine, only the compose
    binary; KEEL_COMPOSE_BIN names one that is not on PATH."""
    cmd = _compose_v2()
    if cmd is None:
        pytest.skip("no Docker Compose v2 here (docker compose, docker-compose, KEEL_COMPOSE_BIN)")
    run_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")} | env
    for profiles in ([], ["--profile", "*"]):
        result = subprocess.run(
            [*cmd, "--env-file", os.devnull, "-f", str(ROOT / COMPOSE_NAME), *profiles]
            + ["config", "--quiet"],
            capture_output=True,
            text=True,
            env=run_env,
            cwd=ROOT,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr


def test_promtool_check_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
