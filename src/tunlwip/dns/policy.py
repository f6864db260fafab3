"""DNS policy: which names are blocked, allowed or answered locally, decided in O(labels).

Rules
-----
Names are compared case-insensitively and without the trailing dot, in the form dnspython
gives them (``name.to_text(omit_final_dot=True).lower()``, so internationalised names are
compared in their ``xn--`` form; a non-ASCII name in a list is converted to that form).

Block and allow lists are text files, any number of each, merged. One rule per line:

* ``example.com``: exactly that name.
* ``*.example.com``, ``.example.com`` or adblock-style ``||example.com^``: example.com
  **and** every name under it (a whole suffix).
* ``@@||example.com^`` (adblock exception), in any list: an *allow* rule for that suffix.
* hosts-file lines, ``0.0.0.0 a.example b.example`` (any address first, usually ``0.0.0.0``,
  ``127.0.0.1`` or ``::``): exactly those names. ``localhost``, ``localhost.localdomain``,
  ``local``, ``broadcasthost``, ``ip6-*`` and ``0.0.0.0`` are not names and are ignored.
* ``#`` or ``!`` starts a comment, on its own line or after whitespace; blank lines are ignored.

A line that is not one of these (bad label characters, a label over 63 characters, a name
over 253, a lone ``*``, adblock options such as ``$important``, a numeric top-level label) is
skipped and counted in ``DnsPolicy.skipped_lines``, and each file with such lines gets one
warning naming the first of them: a bad line never stops a list from loading. A file that
cannot be read is a ``ConfigError``.

Decision order for a queried name:

1. an override for exactly that name: answer with its addresses (``"override"``);
2. any allow rule matching it, exact or suffix: resolve normally (``"pass"``);
3. any block rule matching it: answer as configured (``"block"``);
4. otherwise ``"pass"``.

So an allow-listed subdomain of a blocked suffix resolves. Rules live in dicts of exact names
and of suffixes; a lookup probes the name and each of its parents, never the rule list.

Answers are checked too (``check_answer``): a tracker hidden behind a CNAME of an innocent
name ("CNAME cloaking": ``metrics.shop.example CNAME shop.tracker.example``) would otherwise
pass, since only the question is in the query. The chain is followed from the question name
through the answer section's CNAMEs (and DNAMEs) exactly as a client follows it; each name on it
is checked like a question, and the first blocked one blocks the whole answer. The walk visits
each name at most once (a CNAME loop ends it), follows every target of an (invalid) CNAME
RRset with several, and takes at most one step per answer record, so an upstream cannot make
it long. A question name matched by an allow rule is trusted with its
whole chain (the operator said it resolves); an allow rule on a name along the chain spares
that name only.

``blocked_response`` and ``override_response`` build the answers the proxy sends for the
``"block"`` and ``"override"`` verdicts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ..endpoint import IPAddress
from ..errors import ConfigError
from ..hostname import MAX_NAME, is_list_name

log = logging.getLogger("tunlwip.dns.policy")

BlockedAnswer = Literal["nxdomain", "null", "refused"]
BLOCKED_ANSWERS: tuple[BlockedAnswer, ...] = ("nxdomain", "null", "refused")
SYNTHESIZED_TTL = 60  # seconds, for every record we make up (overrides, null answers)

_HOSTS_NON_NAMES = frozenset(
    {"localhost", "localhost.localdomain", "local", "broadcasthost", "0.0.0.0"}
)
_COMMON_HOSTS_ADDRESSES = frozenset({"0.0.0.0", "127.0.0.1", "::", "::1"})

#: Names of well-known public DNS-over-HTTPS resolvers (whole suffixes), blocked with
#: ``dns.reject_encrypted``: a client that cannot resolve its DoH server falls back to plain
#: DNS, which the proxy answers. DoH itself looks like any HTTPS, so this list (with the
#: operator's own block lists) is the only handle on it. ``use-application-dns.net`` is
#: Mozilla's canary: Firefox turns its default DoH off when that name does not resolve.
ENCRYPTED_DNS_NAMES: tuple[str, ...] = (
    "use-application-dns.net",
    "||dns.google^",
    "||cloudflare-dns.com^",
    "||dns.quad9.net^",
    "||doh.opendns.com^",
    "||doh.cleanbrowsing.org^",
    "||dns.adguard.com^",
    "||dns.adguard-dns.com^",
    "||dns.nextdns.io^",
    "||doh.dns.sb^",
    "||dns.mullvad.net^",
    "||doh.mullvad.net^",
    "||dns.alidns.com^",
    "||doh.pub^",
    "||doh.360.cn^",
    "||doh.xfinity.com^",
    "||dns.controld.com^",
)

# Rules are kept as name -> origin, where origin packs the source and line (see _Origins) so
# a million rules cost one small int each rather than one string each.
_ORIGIN_BITS = 20  # low bits: index into the sources list; high bits: line number


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do with a query: resolve it, block it, or answer with ``addresses``."""

    action: Literal["pass", "block", "override"]
    addresses: tuple[IPAddress, ...] = ()
    rule: str = ""  # the matching rule, for the query log


PASS = Verdict("pass")


def _normalize(text: str) -> str | None:
    """``text`` as a lowercase name without the final dot, or None if it is not a valid name."""
    if text.endswith("."):
        text = text[:-1]
    text = text.lower()
    if not text.isascii():
        try:
            text = dns.name.from_text(text).to_text(omit_final_dot=True).lower()
        except Exception:  # dnspython raises several types for bad IDNA
            return None
    if len(text) > MAX_NAME or not is_list_name(text) or text.rpartition(".")[2].isdigit():
        return None
    return text


def _parse_rule(token: str) -> tuple[str, bool, bool] | None:
    """One list token as (name, is_suffix, is_exception), or None if it is not a rule."""
    exception = False
    suffix = False
    if token.startswith("@@"):
        exception = True
        token = token[2:]
        if not token.startswith("||"):
            return None
    if token.startswith("||"):
        token = token[2:]
        token = token.removesuffix("^")
        suffix = True
    elif token.startswith("*."):
        token = token[2:]
        suffix = True
    elif token.startswith("."):
        token = token[1:]
        suffix = True
    name = _normalize(token)
    return None if name is None else (name, suffix, exception)


def _is_address(token: str) -> bool:
    if token in _COMMON_HOSTS_ADDRESSES:
        return True
    try:
        ipaddress.ip_address(token.split("%", 1)[0])  # fe80::1%eth0 appears in hosts files
    except ValueError:
        return False
    return True


def _parse_addresses(name: str, addresses: Sequence[str | IPAddress]) -> tuple[IPAddress, ...]:
    if isinstance(addresses, str):
        addresses = [addresses]
    if not addresses:
        raise ConfigError(f"DNS override {name!r}: no addresses")
    parsed: list[IPAddress] = []
    for address in addresses:
        if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            parsed.append(address)
            continue
        try:
            parsed.append(ipaddress.ip_address(str(address).strip()))
        except ValueError:
            raise ConfigError(
                f"DNS override {name!r}: {address!r} is not an IPv4 or IPv6 address"
            ) from None
    return tuple(parsed)


class _RuleSet:
    """Exact names and suffixes of one kind (block or allow), each with its origin."""

    def __init__(self) -> None:
        self.exact: dict[str, int] = {}
        self.suffix: dict[str, int] = {}

    def add(self, name: str, suffix: bool, origin: int) -> None:
        """Add a rule; a duplicate keeps the origin of its first occurrence."""
        (self.suffix if suffix else self.exact).setdefault(name, origin)

    def __len__(self) -> int:
        return len(self.exact) + len(self.suffix)

    def match(self, name: str) -> tuple[str, int] | None:
        """The rule matching ``name`` (as its text and origin), the most specific first."""
        origin = self.exact.get(name)
        if origin is not None:
            return name, origin
        if not self.suffix:
            return None
        start = 0
        while True:
            origin = self.suffix.get(name[start:] if start else name)
            if origin is not None:
                return "*." + name[start:], origin
            start = name.find(".", start) + 1
            if not start:
                return None


class DnsPolicy:
    """Block lists, allow-list exceptions and static overrides; ``check`` decides a name.

    ``blocked`` and ``allowed`` take rules in the list-line syntax (``example.com``,
    ``*.example.com``, ``||example.com^``); invalid ones are skipped and counted like bad
    lines in a file. ``overrides`` maps exact names to one or more addresses.
    """

    def __init__(
        self,
        blocked: Iterable[str] = (),
        allowed: Iterable[str] = (),
        overrides: Mapping[str, Sequence[str | IPAddress]] = {},
    ) -> None:
        self._block = _RuleSet()
        self._allow = _RuleSet()
        self._sources: list[str] = [""]  # index 0: rules given as arguments, no location
        self._overrides: dict[str, Verdict] = {}
        self.skipped_lines = 0
        for rule in blocked:
            self.skipped_lines += not self._load_line(rule, self._block, 0)
        for rule in allowed:
            self.skipped_lines += not self._load_line(rule, self._allow, 0)
        for name, addresses in overrides.items():
            self._add_override(name, addresses)

    @classmethod
    def from_files(
        cls,
        block_files: Sequence[str | Path] = (),
        allow_files: Sequence[str | Path] = (),
        overrides: Mapping[str, Sequence[str | IPAddress]] = {},
        builtin_blocked: Sequence[str] = (),
        builtin_source: str = "built in",
    ) -> DnsPolicy:
        """Load block and allow lists (all merged) plus overrides, and ``builtin_blocked``
        rules (named ``builtin_source`` in the query log); an unreadable file raises
        ``ConfigError``, bad lines are skipped, counted and logged once per file."""
        policy = cls(overrides=overrides)
        if builtin_blocked:
            source = len(policy._sources)
            policy._sources.append(builtin_source)
            for rule in builtin_blocked:
                if not policy._load_line(rule, policy._block, source):
                    raise ValueError(f"invalid built-in DNS rule {rule!r}")
        for path in block_files:
            policy._load(Path(path), policy._block)
        for path in allow_files:
            policy._load(Path(path), policy._allow)
        return policy

    def __len__(self) -> int:
        """The number of distinct rules (block, allow and override), for the log line."""
        return len(self._block) + len(self._allow) + len(self._overrides)

    def __repr__(self) -> str:
        return (
            f"<DnsPolicy {len(self._block)} block, {len(self._allow)} allow, "
            f"{len(self._overrides)} override rules, {self.skipped_lines} lines skipped>"
        )

    def check(self, name: dns.name.Name | str) -> Verdict:
        """The verdict for a queried name: override, then allow, then block, else pass."""
        if isinstance(name, dns.name.Name):
            text = name.to_text(omit_final_dot=True).lower()
        else:
            text = name.removesuffix(".").lower()
            if not text.isascii():
                text = _normalize(text) or text
        override = self._overrides.get(text)
        if override is not None:
            return override
        if not self._block:
            return PASS
        allowed = self._allow.match(text)
        if allowed is not None:
            return Verdict("pass", rule=self._describe("allow", *allowed))
        blocked = self._block.match(text)
        if blocked is not None:
            return Verdict("block", rule=self._describe("block", *blocked))
        return PASS

    @property
    def screens_answers(self) -> bool:
        """Whether ``check_answer`` can block anything (there are block rules)."""
        return bool(self._block)

    def check_answer(self, response: dns.message.Message) -> Verdict:
        """The verdict for the names a response's answer leads to (its CNAME/DNAME chain from
        the question name): "block" for the first blocked one, else pass."""
        if not self._block or len(response.question) != 1 or not response.answer:
            return PASS
        name = response.question[0].name
        if self.check(name).action != "pass" or self._allow.match(_text(name)) is not None:
            return PASS  # blocked or overridden questions never get here; allowed: trusted
        aliases: dict[dns.name.Name, list[dns.name.Name]] = {}
        dnames: list[tuple[dns.name.Name, dns.name.Name]] = []
        records = 0
        for rrset in response.answer:
            records += len(rrset)
            if rrset.rdtype == dns.rdatatype.CNAME:
                aliases.setdefault(rrset.name, []).extend(rdata.target for rdata in rrset)
            elif rrset.rdtype == dns.rdatatype.DNAME:
                dnames.extend((rrset.name, rdata.target) for rdata in rrset)
        # Every branch (an invalid CNAME RRset with several targets is followed whole), each
        # name once, at most one step per record: an upstream cannot make the walk long.
        pending, seen = [name], {name}
        while pending and records > 0:
            records -= 1
            current = pending.pop()
            targets = aliases.get(current)
            if targets is None:
                rewritten = _dname_target(current, dnames)
                targets = [rewritten] if rewritten is not None else []
            for target in targets:
                if target in seen:
                    continue
                seen.add(target)
                verdict = self.check(target)
                if verdict.action == "block":
                    return Verdict("block", rule=f"cname:{_text(target)} {verdict.rule}")
                pending.append(target)
        return PASS

    # -- loading --------------------------------------------------------------------------

    def _describe(self, kind: str, rule: str, origin: int) -> str:
        source = self._sources[origin & ((1 << _ORIGIN_BITS) - 1)]
        if not source:
            return f"{kind}:{rule}"
        line = origin >> _ORIGIN_BITS
        return f"{kind}:{rule} ({source}:{line})" if line else f"{kind}:{rule} ({source})"

    def _add_override(self, name: str, addresses: Sequence[str | IPAddress]) -> None:
        normalized = _normalize(name.strip())
        if normalized is None:
            raise ConfigError(
                f"DNS override {name!r}: not a valid name (overrides are exact names)"
            )
        parsed = _parse_addresses(name, addresses)
        self._overrides[normalized] = Verdict("override", parsed, f"override:{normalized}")

    def _load(self, path: Path, rules: _RuleSet) -> None:
        source = len(self._sources)
        if source >= 1 << _ORIGIN_BITS:
            raise ConfigError(f"{path}: too many DNS list files")
        self._sources.append(str(path))
        skipped = 0
        first_bad: tuple[int, str] | None = None
        try:
            with path.open(encoding="utf-8-sig", errors="replace") as lines:
                for lineno, line in enumerate(lines, 1):
                    if self._load_line(line, rules, (lineno << _ORIGIN_BITS) | source):
                        continue
                    skipped += 1
                    if first_bad is None:
                        first_bad = (lineno, line.strip())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read DNS list: {exc.strerror or exc}") from exc
        if first_bad is not None:
            self.skipped_lines += skipped
            log.warning(
                "%s: skipped %d invalid line%s (first: line %d: %.80r)",
                path,
                skipped,
                "" if skipped == 1 else "s",
                *first_bad,
            )

    def _load_line(self, line: str, rules: _RuleSet, origin: int) -> bool:
        """Add the rules on one list line; False if the line (or part of it) is invalid."""
        tokens = line.split()
        if not tokens or tokens[0][0] in "#!":
            return True
        if len(tokens) == 1:
            parsed = _parse_rule(tokens[0])
            if parsed is None:
                return False
            name, suffix, exception = parsed
            (self._allow if exception else rules).add(name, suffix, origin)
            return True
        if tokens[1][0] in "#!":  # a rule with a trailing comment
            return self._load_line(tokens[0], rules, origin)
        if not _is_address(tokens[0]):
            return False
        ok = True
        for token in tokens[1:]:
            if token[0] in "#!":
                break
            lowered = token.lower()
            if lowered in _HOSTS_NON_NAMES or lowered.startswith("ip6-"):
                continue
            host = _normalize(lowered)
            if host is None:
                ok = False
            else:
                rules.add(host, False, origin)
        return ok


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _dname_target(
    name: dns.name.Name, dnames: Sequence[tuple[dns.name.Name, dns.name.Name]]
) -> dns.name.Name | None:
    """The name a DNAME of the answer rewrites ``name`` to (RFC 6672), if one applies."""
    for owner, target in dnames:
        if name != owner and name.is_subdomain(owner):
            try:
                return name.relativize(owner).derelativize(target)
            except dns.name.NameTooLong:
                return None
    return None


# -- answers ------------------------------------------------------------------------------


def _address_rrset(
    query: dns.message.Message, addresses: Iterable[IPAddress], ttl: int
) -> dns.rrset.RRset | None:
    """An A or AAAA RRset answering the query's question from ``addresses``, if any fit."""
    if len(query.question) != 1:
        return None
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return None
    if question.rdtype == dns.rdatatype.A:
        texts = [str(a) for a in addresses if a.version == 4]
    elif question.rdtype == dns.rdatatype.AAAA:
        texts = [str(a) for a in addresses if a.version == 6]
    else:
        return None
    if not texts:
        return None
    return dns.rrset.from_text_list(question.name, ttl, question.rdclass, question.rdtype, texts)


def blocked_response(query: dns.message.Message, how: BlockedAnswer) -> dns.message.Message:
    """The answer to a blocked query: NXDOMAIN, REFUSED, or a null address (0.0.0.0 for A,
    :: for AAAA, no data for other types). Keeps the query's ID, question, RD and EDNS."""
    response = dns.message.make_response(query, recursion_available=True)
    if how == "nxdomain":
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif how == "refused":
        response.set_rcode(dns.rcode.REFUSED)
    elif how == "null":
        null = (ipaddress.IPv4Address(0), ipaddress.IPv6Address(0))
        rrset = _address_rrset(query, null, SYNTHESIZED_TTL)
        if rrset is not None:
            response.answer.append(rrset)
    else:
        raise ValueError(f"blocked answer must be one of {BLOCKED_ANSWERS}, not {how!r}")
    return response


def override_response(
    query: dns.message.Message, addresses: Sequence[IPAddress], ttl: int = SYNTHESIZED_TTL
) -> dns.message.Message:
    """The answer to an overridden name: the addresses of the asked family (A or AAAA), or
    no data (NOERROR, empty answer) for other types or when that family has none."""
    response = dns.message.make_response(query, recursion_available=True)
    rrset = _address_rrset(query, addresses, ttl)
    if rrset is not None:
        response.answer.append(rrset)
    return response


def parse_name_rule(text: str) -> tuple[str, bool] | None:
    """One name in the lists' syntax (``example.com``; ``*.example.com``, ``.example.com`` or
    ``||example.com^`` for the name and every name under it) as (the name as lookups compare
    it, whether it covers the names under it); None if ``text`` is not one. For the other users
    of this syntax (routes' ``domains``), so that a name means the same everywhere."""
    parsed = _parse_rule(text.strip()) if isinstance(text, str) and text.strip() else None
    if parsed is None or parsed[2]:  # an "@@" exception means nothing outside the DNS lists
        return None
    return parsed[0], parsed[1]
