"""The binding: the only Python code that touches the compiled lwIP module (``tunlwip._lwip``).

Theory of operation: everything else in tunlwip calls typed functions here and never sees
``ffi`` or ``lib``. The submodules are grouped by job:

* ``ffi``: imports the compiled module (and checks it matches the package);
* ``err``: lwIP's ``err_t`` values, declared once (pure Python, no compiled code);
* ``check``: one function per return-code convention of the C API;
* ``callbacks``: the ``extern "Python"`` callbacks and the ``Sink`` they report to;
* ``core``: lifecycle, clock, counters, policy knobs, packet input, UDP/ICMP output;
* ``tcp``: one lwIP TCP connection (an opaque PCB);
* ``relay``: the C relays and the poll set they share with the device and watchers.
* ``udp_relay``: UDP sessions relayed in C (open, close, their activity in batches).

Every wrapper says which return-code convention it uses; callers never decode codes. Calls
whose result needs no decoding are plain aliases of the C function (no Python frame of their
own), so the per-byte and per-wakeup paths (the poll loop, ``tcp_recved``, ``tcp_sndbuf``)
cost what a direct ``lib`` call costs; a wrapper that converts arguments or checks a result
(``input_packet``, ``udp_send``, ``tcp.write``) adds one frame.

This ``__init__`` imports nothing, so ``tunlwip.errors`` can use ``err`` without a cycle.
"""
