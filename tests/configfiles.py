"""Shared ground of the configuration tests (tests/test_config_*.py): where the files live,
writing and loading a file, collecting its problems, the flags of ``tunlwip up``, a file that sets
every key to a non-default value, and the fixtures ``no_etc`` and ``full_file``.

Why: the configuration tests are split by concern (loading files and flags, errors with their key
paths, the ``check-config``/``up`` commands with docs, reload and logging), and each needs the
same few steps to turn TOML text into Settings or problems. A test module uses the fixtures here
by importing them as themselves (``from configfiles import no_etc as no_etc``): pytest looks
fixtures up by name in the test module, and the redundant alias tells ruff the import is
deliberate. ``no_etc`` is autouse, so every module that imports it reads no machine's
/etc/tunlwip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tunlwip import config as cfg
from tunlwip.cli import build_parser, overrides_from_args
from tunlwip.config import ConfigProblems, Settings
from tunlwip.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "contrib" / "tunlwip.example.toml"
UPSTREAM = "udp://198.18.1.2:53"


@pytest.fixture(autouse=True)
def no_etc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Default files come from an empty directory, never the machine's /etc/tunlwip."""
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.setattr(cfg.loader, "CONFIG_DIR", etc)
    return etc


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, **overrides: object) -> Settings:
    return cfg.load(write(tmp_path / "t.toml", text), {"device.name": "tlw0", **overrides})


def problems(tmp_path: Path, text: str, **overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text, **overrides)
    return exc.value.problems if isinstance(exc.value, ConfigProblems) else [str(exc.value)]


def flags(*argv: str) -> dict[str, object]:
    return overrides_from_args(build_parser().parse_args(["up", *argv]))


NON_DEFAULT = """\
[device]
name = "tlwfile0"
mtu = 9000
ipv4 = "198.18.0.9"
ipv6 = "fd00:18::9"
client_networks = ["198.18.4.0/24"]
verify_checksums = false

[protect]
fwmark = "0x1d"

[tcp]
dial_timeout = 7
idle_timeout = 70.5
dial_before_accept = false
unreachable = "rst"
max_pending_dials = 77
claim_timeout = 3
max_connections = 500

[udp]
idle_timeout = 11
dns_idle_timeout = 4
sweep_interval = 2
max_sessions = 99
queue_datagrams = 8

[quic]
mode = "drop"
ports = [8443]

[icmp]
echo = "off"
idle_timeout = 9

[dns]
hijack = "gateway"
upstreams = ["udp://198.18.1.2:53", "tls://198.18.1.2#dot.test"]
block_lists = ["block.list"]
allow_lists = ["lists/allow.list"]
blocked_answer = "refused"
query_timeout = 4
attempt_timeout = 1.5
tcp_idle_timeout = 12
tcp_query_timeout = 6
reject_encrypted = true
cache_size = 0
min_ttl = 5
max_ttl = 600
max_negative_ttl = 60
max_in_flight = 10

[dns.overrides]
"nas.home.arpa" = ["198.18.9.9", "fd00:9::9"]
"one.test" = "198.18.9.1"

[logging]
level = "debug"
file = "log/tunlwip.log"

[limits]
grace = 0
"""


@pytest.fixture
def full_file(tmp_path: Path) -> Path:
    """NON_DEFAULT in tmp_path/conf, with its relative list files."""
    conf = tmp_path / "conf"
    (conf / "lists").mkdir(parents=True)
    write(conf / "block.list", "ads.test\n")
    write(conf / "lists" / "allow.list", "ok.ads.test\n")
    return write(conf / "full.toml", NON_DEFAULT)
