"""Run a systemd unit's commands as systemd would, on a machine whose PID 1 is not systemd.

``Unit.parse`` reads a unit file (``[Section]``, ``Key=value``, repeated keys kept in order);
``Unit.command`` expands one ``Exec*=`` line as systemd does: specifiers (``%i``, ``%E``,
``%%``), ``${VAR}`` replaced inside a word, a lone ``$VAR`` split into words (none when
empty), and the ``-@:+!`` prefixes dropped. ``Unit.environment`` is ``Environment=`` and
``EnvironmentFile=`` (``-`` prefix: optional) over a base environment, plus what systemd sets
(``CONFIGURATION_DIRECTORY``, ``MAINPID`` for ExecReload).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Unit:
    path: Path
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    instance: str = ""
    config_root: str = "/etc"  # %E

    @classmethod
    def parse(cls, path: Path, instance: str, config_root: str) -> Unit:
        unit = cls(path, {}, instance, config_root)
        section = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                unit.sections.setdefault(section, [])
                continue
            key, _, value = line.partition("=")
            unit.sections[section].append((key.strip(), value.strip()))
        return unit

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, key: str, section: str = "Service") -> str | None:
        found = self.values(key, section)
        return found[-1] if found else None

    def specifiers(self, text: str) -> str:
        table = {"i": self.instance, "E": self.config_root, "%": "%"}
        return re.sub(r"%(.)", lambda m: table[m[1]], text)

    def environment(self, base: dict[str, str], **extra: str) -> dict[str, str]:
        env = dict(base)
        if d := self.value("ConfigurationDirectory"):
            env["CONFIGURATION_DIRECTORY"] = f"{self.config_root}/{d}"
        for assignment in self.values("Environment"):
            for word in shlex.split(self.specifiers(assignment)):
                k, _, v = word.partition("=")
                env[k] = v
        for spec in self.values("EnvironmentFile"):
            optional = spec.startswith("-")
            path = Path(self.specifiers(spec.lstrip("-")))
            if not path.exists():
                assert optional, f"EnvironmentFile {path} is missing"
                continue
            for line in path.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    k, _, v = line.partition("=")
                    env[k.strip()] = " ".join(shlex.split(v))
        env.update(extra)
        return env

    def command(self, key: str, env: dict[str, str]) -> list[str]:
        line = self.value(key)
        assert line, f"no {key}= in {self.path}"
        line = self.specifiers(line).lstrip("-@:+!")
        out: list[str] = []
        for word in shlex.split(line):
            if m := re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word):
                out += env.get(m[1], "").split()
            else:
                out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                  lambda m: env.get(m[1], ""), word))
        return out

    def capabilities(self) -> list[str]:
        """CapabilityBoundingSet= as setpriv names (``cap_bpf`` -> ``bpf``)."""
        caps = " ".join(self.values("CapabilityBoundingSet")).split()
        return [c.lower().removeprefix("cap_") for c in caps]
