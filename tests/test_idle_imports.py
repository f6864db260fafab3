"""What ``tunlwip up`` imports before it serves: no module of a feature the gateway may not use.

Why: every module imported stays in memory for the gateway's life, and an idle gateway's RSS
is mostly Python's modules (trio and dnspython the largest, then tunlwip's own). HTTP (h11,
for DoH upstreams and HTTP CONNECT proxies) and difflib (for "did you mean" in a bad
configuration) are imported where they are used, so a gateway that never needs them does not
pay for them (about 0.3 MiB of RSS; docs/performance.md). A fresh interpreter, so modules
other tests imported do not count.
"""

from __future__ import annotations

import subprocess
import sys

#: Imported only by the code that needs them.
ON_DEMAND = ("h11", "difflib", "tunlwip.dns.doh")


def test_the_cli_imports_no_module_of_an_unused_feature() -> None:
    names = ",".join(ON_DEMAND)
    code = f"import sys, tunlwip.cli\nprint(*[m for m in {names!r}.split(',') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "", f"imported at startup: {out.stdout.strip()}"


def test_parsing_a_doh_upstream_imports_http_then() -> None:
    """The other half: a DoH upstream still gets its HTTP/1.1 client, at parse time (not on
    the first query)."""
    code = (
        "import sys\n"
        "from tunlwip.dialer import Dialer\n"
        "from tunlwip.dns.upstreams import parse_upstream\n"
        "parse_upstream('https://198.18.0.53/dns-query', Dialer())\n"
        "print('h11' in sys.modules, 'tunlwip.dns.doh' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.split() == ["True", "True"], out
