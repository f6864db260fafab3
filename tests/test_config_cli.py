"""``check-config``, ``up``'s exit on a bad file, the docs, reload and logging (tunlwip.cli).

Why: a bad configuration must exit 78 before the TUN is touched, ``check-config --print`` must
round-trip, SIGHUP must apply a new file (or keep the old one when it is broken),
docs/configuration.md must describe exactly the keys and defaults the code has, and logs must
suit journald and rotation.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tunlwip import MemoryDevice
from tunlwip import config as cfg
from tunlwip.cli import (
    EXIT_CONFIG,
    EXIT_OK,
    Reloader,
    build_parser,
    main,
    reload,
)
from tunlwip.config import SCHEMA
from tunlwip.config.dns_routes import DNS_ROUTE_KEYS, DnsRoute
from tunlwip.config.fields import spec_of
from tunlwip.config.routes import ROUTE_KEYS, Route
from tunlwip.gateway import Gateway
from tunlwip.service import configure_logging

from configfiles import DOCS, EXAMPLE, UPSTREAM, flags, write
from configfiles import full_file as full_file
from configfiles import no_etc as no_etc

# -- check-config ------------------------------------------------------------------------------


def test_check_config_ok_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good.toml", "[device]\nmtu = 1400\n")
    assert main(["check-config", "--config", str(good), "--iface", "tlw0"]) == EXIT_OK
    assert "configuration OK" in capsys.readouterr().out
    bad = write(tmp_path / "bad.toml", '[udp]\nidle_timeout = "abc"\n[tcp]\nidel_timeout = 1\n')
    assert main(["check-config", "--config", str(bad), "--iface", "tlw0"]) == EXIT_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err == [
        'tunlwip check-config: udp.idle_timeout: expected a number, got "abc"',
        "tunlwip check-config: unknown key tcp.idel_timeout (did you mean idle_timeout?)",
    ]


def test_check_config_needs_an_interface_or_a_file() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check-config"])
    assert exc.value.code == 2


def _print(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["check-config", "--print", *argv]) == EXIT_OK
    return capsys.readouterr().out


def test_print_round_trips(
    full_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The printed configuration, fed back with --config from elsewhere, is the same
    configuration (flags included), and prints the same again."""
    first = _print(capsys, "--config", str(full_file), "--grace", "2.5", "--icmp", "forward")
    printed = write(tmp_path / "printed.toml", first)
    monkeypatch.chdir("/")
    original = cfg.load(full_file, flags("--grace", "2.5", "--icmp", "forward"))
    again = cfg.load(printed)
    assert again.gateway == original.gateway
    assert {opt.path: again.value(opt) for opt in SCHEMA} == {
        opt.path: original.value(opt) for opt in SCHEMA
    }
    assert dataclasses.replace(again, source=None) == dataclasses.replace(original, source=None)
    second = _print(capsys, "--config", str(printed))
    assert first.splitlines()[1:] == second.splitlines()[1:]  # all but the "from ..." header
    keys = {f"{section}.{key}" for section, key in _printed_keys(first)}
    assert keys == {opt.path for opt in SCHEMA}, "every key is printed"


def test_print_of_the_defaults_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _print(capsys, "--iface", "tlw0")
    assert "# fwmark: not set (none)" in text and "sweep_interval = 30.0" in text
    again = cfg.load(write(tmp_path / "d.toml", text))
    assert again.gateway == cfg.load(None, {"device.name": "tlw0"}).gateway
    assert {f"{s}.{k}" for s, k in _printed_keys(text)} == {opt.path for opt in SCHEMA}


def _printed_keys(text: str) -> Iterator[tuple[str, str]]:
    section = ""
    for line in text.splitlines():
        if m := re.match(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"(?:# )?(\w+)(?: =|: not set)", line):
            yield section, m.group(1)


def test_example_file_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(EXAMPLE)]) == EXIT_OK, capsys.readouterr().err
    settings = cfg.load(EXAMPLE)
    assert settings.iface == "dmesh1" and settings.protect == (0x1D, None)


def test_docs_examples_are_accepted(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/configuration.md has a TOML example"
    for i, block in enumerate(blocks):
        cfg.load(write(tmp_path / f"doc{i}.toml", block), {"device.name": "tlw0"})


# -- the docs match the schema -----------------------------------------------------------------


def documented() -> dict[str, dict[str, str]]:
    """{key path: {"type", "default", "flag"}} from the tables of docs/configuration.md (the
    ``[[route]]`` table's keys as ``route.KEY``)."""
    rows: dict[str, dict[str, str]] = {}
    section = None
    for line in DOCS.read_text().splitlines():
        if m := re.match(r"## `\[(\w+)\]`", line):
            section = m.group(1)
        elif line.startswith("## "):
            tables = {"## `[[route]]`": "route", "## `[[dns.route]]`": "dns.route"}
            section = next((v for k, v in tables.items() if line.startswith(k)), None)
        elif section and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            key, kind, default, flag = cells[0].strip("`"), cells[1], cells[2], cells[3]
            path = f"{section}.{key}"
            assert path not in rows, f"{path} documented twice"
            rows[path] = {"type": kind, "default": default, "flag": flag}
    return rows


def test_docs_document_every_key_with_its_default_type_and_flag() -> None:
    docs = documented()
    route_keys = [path for path in docs if path.startswith(("route.", "dns.route."))]
    docs = {path: row for path, row in docs.items() if path not in route_keys}
    assert list(docs) == [opt.path for opt in SCHEMA], "every key, in the order of --print"
    sections = re.findall(r"^## `\[(\w+)\]`", DOCS.read_text(), re.M)
    assert sections == list(cfg.SECTIONS), "one docs section per schema section, same order"
    for opt in SCHEMA:
        doc = docs[opt.path]
        assert doc["default"] == opt.default_text, opt.path
        assert doc["type"] == opt.kind.doc, opt.path
        flags_cell = re.findall(r"`(--[\w-]+)`", doc["flag"])
        assert flags_cell[:1] == ([opt.cli] if opt.cli else []), opt.path


def test_docs_document_every_route_key() -> None:
    """The [[route]] table's keys: all of them, in the order of --print, with type and
    default as declared on the Route struct."""
    docs = {path: row for path, row in documented().items() if path.startswith("route.")}
    assert list(docs) == [f"route.{key}" for key, _ in ROUTE_KEYS]
    for field in dataclasses.fields(Route):
        spec = spec_of(field)
        assert spec is not None
        doc = docs[spec.path]
        default = spec.unset if field.default is None else f"`{spec.kind.dump(field.default)}`"
        row = (doc["type"], doc["default"], doc["flag"])
        assert row == (spec.kind.doc, default, "—"), spec.path


def test_docs_document_every_dns_route_key() -> None:
    """The [[dns.route]] table's keys: all of them, in the order of --print, with type and
    default as declared on the DnsRoute struct."""
    docs = {path: row for path, row in documented().items() if path.startswith("dns.route.")}
    assert list(docs) == [f"dns.route.{key}" for key, _ in DNS_ROUTE_KEYS]
    for field in dataclasses.fields(DnsRoute):
        spec = spec_of(field)
        assert spec is not None
        row = (docs[spec.path]["type"], docs[spec.path]["default"], docs[spec.path]["flag"])
        assert row == (spec.kind.doc, spec.unset, "—"), spec.path


def test_every_flag_of_up_is_in_the_schema() -> None:
    """No flag bypasses the schema (--config itself and the process's own outputs excepted)."""
    up = build_parser()._subparsers._group_actions[0].choices["up"]  # type: ignore[union-attr,index]
    options = {s for a in up._actions for s in a.option_strings if s.startswith("--")}
    schema_flags = {opt.cli for opt in SCHEMA if opt.cli}
    expected = {
        "--help",
        "--config",
        "--no-dial-before-accept",
        "--no-offload",
        "--no-dns-reject-encrypted",
        "--control-socket",
        "--flow-log",
        # hidden: how the supervisor of --workers N starts a worker (workers.py)
        "--worker-index",
        "--worker-fd",
        "--worker-lifeline",
        "--worker-dir",
    }
    assert options - schema_flags == expected


# -- `tunlwip up` exits 78 before touching the TUN ---------------------------------------------


def test_up_with_a_bad_file_exits_78(tmp_path: Path) -> None:
    """No root needed: the configuration is checked before the TUN is opened."""
    bad = write(tmp_path / "bad.toml", '[udp]\nidle_timeout = "abc"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tunlwip", "up", "--config", str(bad), "--iface", "tlwbad0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert 'udp.idle_timeout: expected a number, got "abc"' in proc.stderr


def test_up_with_a_missing_file_exits_78(tmp_path: Path) -> None:
    assert main(["up", "--config", str(tmp_path / "nope.toml"), "--iface", "tlw0"]) == EXIT_CONFIG


def test_up_with_an_unopenable_log_file_exits_78(tmp_path: Path) -> None:
    log_file = tmp_path / "no-such-dir" / "x.log"
    assert main(["up", "--iface", "tlw0", "--log-file", str(log_file)]) == EXIT_CONFIG


# -- reload -------------------------------------------------------------------------------------


async def test_reload_applies_a_new_file_and_keeps_the_old_on_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What SIGHUP does, on a memory device: policy changes apply, restart-only ones are named
    in one warning, a broken file changes nothing."""
    block = write(tmp_path / "block.list", "ads.test\n")
    path = write(
        tmp_path / "r.toml",
        f'[quic]\nports = [443]\n[dns]\nupstreams = ["{UPSTREAM}"]\nblock_lists = ["block.list"]\n',
    )
    reloader = Reloader(str(path), {"device.name": "tlw0", "protect.fwmark": 7})
    running = reloader.load()
    gateway = Gateway(MemoryDevice(), running.gateway, protector=running.protector())
    assert gateway.dns is not None
    caplog.set_level(logging.INFO, logger="tunlwip")

    block.write_text("ads.test\nlater.test\n")
    path.write_text(path.read_text().replace("[443]", "[8443, 9443]") + "[device]\nmtu = 9000\n")
    current = reload(gateway, running, running, reloader)
    assert gateway.config.stack.blocked_udp_ports == (8443, 9443)
    assert gateway.stack.config.blocked_udp_ports == (8443, 9443)
    assert len(gateway.dns.policy) == 2 and current.gateway.stack.mtu == 9000
    assert gateway.config.stack.mtu == 1500  # needs a restart
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["reload: these settings need a restart: device.mtu"]
    info = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reloaded ")]
    assert info == [
        f"reloaded {path}: 2 DNS rules, upstreams {UPSTREAM}, quic reject 8443,9443, icmp reply"
    ]

    caplog.clear()
    path.write_text(path.read_text().replace("[8443, 9443]", '"many"'))
    assert reload(gateway, running, current, reloader) is current
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "reload: configuration not reloaded, keeping the old one: quic.ports: "
        'expected a list, got "many"'
    ]
    assert gateway.config.stack.blocked_udp_ports == (8443, 9443)

    caplog.clear()  # a protection change is named too; the flags still apply on reload
    path.write_text('[protect]\ninterface = "eth0"\n')
    current = reload(gateway, running, current, reloader)
    assert current.protect == (7, None), "the --fwmark flag still overrides the file"
    path.write_text("[device]\nmtu = 1500\n")
    reloader.overrides.pop("protect.fwmark")
    reload(gateway, running, current, reloader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["reload: these settings need a restart: protect.fwmark"]
    assert gateway.protect_mode == "fwmark 0x7"
    await trio.lowlevel.checkpoint()


# -- logging ------------------------------------------------------------------------------------

#: `tunlwip up` with a bad file, its stderr made the journal stream when argv[1] is "journal".
JOURNALD_SCRIPT = r"""
import os, sys
from tunlwip.cli import main
if sys.argv[1] == "journal":
    st = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
sys.exit(main(["up", "--iface", "tlw0", "--config", sys.argv[2]]))
"""


@pytest.mark.parametrize("where", ["journal", "terminal"])
def test_no_timestamps_under_journald(where: str, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "[udp]\nidle_timeout = -1\n")
    proc = subprocess.run([sys.executable, "-c", JOURNALD_SCRIPT, where, str(bad)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == EXIT_CONFIG
    line = "ERROR tunlwip: bad configuration: udp.idle_timeout: must be > 0, got -1\n"
    if where == "journal":
        assert proc.stderr == "<3>" + line  # journald's priority prefix, no timestamp
    else:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} " + re.escape(line), proc.stderr)


def test_log_file_is_appended_and_reopened(tmp_path: Path) -> None:
    """--log-file appends with timestamps; each configure_logging (SIGHUP) reopens the file,
    so a rotated log is recreated."""
    path = tmp_path / "gw.log"
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        configure_logging("debug", str(path))
        logging.getLogger("tunlwip.test").debug("first")
        path.rename(tmp_path / "gw.log.1")
        configure_logging("warning", str(path))
        logging.getLogger("tunlwip.test").info("dropped")
        logging.getLogger("tunlwip.test").warning("second")
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    assert (tmp_path / "gw.log.1").read_text().endswith(" DEBUG tunlwip.test: first\n")
    assert path.read_text().endswith(" WARNING tunlwip.test: second\n")
    assert "dropped" not in path.read_text()
