"""DNS policy: list formats, decision order, overrides and the synthesized answers.

Why: the policy decides what every client may resolve; a misparsed line either leaks a blocked
name or breaks a site, and one bad line must never drop a whole list. Pure code, no I/O except
list files written to ``tmp_path``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunlwip.dns.policy import DnsPolicy, Verdict, blocked_response, override_response
from tunlwip.endpoint import IPAddress
from tunlwip.errors import ConfigError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- list formats ---------------------------------------------------------------------------


def test_exact_rule_matches_only_that_name() -> None:
    policy = DnsPolicy(blocked=["ads.example"])
    assert policy.check("ads.example").action == "block"
    assert policy.check("x.ads.example").action == "pass"
    assert policy.check("example").action == "pass"
    assert policy.check("badads.example").action == "pass"


@pytest.mark.parametrize(
    "rule", ["*.ads.example", ".ads.example", "||ads.example^", "||ads.example"]
)
def test_suffix_forms_match_the_name_and_everything_under_it(rule: str) -> None:
    policy = DnsPolicy(blocked=[rule])
    for name in ["ads.example", "x.ads.example", "a.b.c.ads.example"]:
        assert policy.check(name).action == "block", name
    for name in ["example", "badads.example", "ads.example.org", "ads.exampl"]:
        assert policy.check(name).action == "pass", name
    assert policy.check("x.ads.example").rule == "block:*.ads.example"


def test_names_compare_case_insensitively_without_final_dot() -> None:
    policy = DnsPolicy(blocked=["Ads.Example.", "*.Tracker.EXAMPLE"])
    for name in ["ads.example", "ADS.EXAMPLE.", "a.tracker.example", "A.TRACKER.Example."]:
        assert policy.check(name).action == "block", name
        assert policy.check(dns.name.from_text(name)).action == "block", name


def test_idna_names_compare_in_their_ascii_form() -> None:
    policy = DnsPolicy(blocked=["bücher.example"])
    assert policy.check(dns.name.from_text("BÜCHER.example")).action == "block"
    assert policy.check("xn--bcher-kva.example").action == "block"
    assert policy.check("bücher.example").action == "block"


def test_root_and_odd_names_pass() -> None:
    policy = DnsPolicy(blocked=["*.example"])
    assert policy.check(dns.name.root).action == "pass"
    assert policy.check(dns.name.from_text(r"a\.b")).action == "pass"
    assert policy.check("").action == "pass"


def test_list_file_formats(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "block.txt",
        "# a comment\n"
        "! adblock comment\n"
        "\n"
        "   \n"
        "exact.example\n"
        "*.wild.example\n"
        ".dot.example   # trailing comment\n"
        "||adblock.example^\n"
        "@@||ok.adblock.example^\n"
        "0.0.0.0 h1.example H2.example  # two names\n"
        "127.0.0.1 h3.example\n"
        ":: h4.example\n"
        "127.0.0.1 localhost localhost.localdomain local broadcasthost\n"
        "::1 ip6-localhost ip6-loopback\n"
        "0.0.0.0 0.0.0.0\n"
        "crlf.example\r\n",
    )
    policy = DnsPolicy.from_files([path])
    assert policy.skipped_lines == 0
    blocked = ["exact.example", "x.wild.example", "wild.example", "y.dot.example"]
    blocked += ["adblock.example", "a.adblock.example", "h1.example", "h2.example"]
    blocked += ["h3.example", "h4.example", "crlf.example"]
    for name in blocked:
        assert policy.check(name).action == "block", name
    passed = ["x.exact.example", "x.h1.example", "ok.adblock.example", "x.ok.adblock.example"]
    passed += ["localhost", "local", "broadcasthost", "ip6-localhost", "comment"]
    for name in passed:
        assert policy.check(name).action == "pass", name
    assert policy.check("ok.adblock.example").rule == f"allow:*.ok.adblock.example ({path}:9)"
    assert policy.check("h2.example").rule == f"block:h2.example ({path}:10)"
    assert len(policy) == 9 + 1


def test_several_files_merge(tmp_path: Path) -> None:
    one = write(tmp_path, "one.txt", "a.example\n")
    two = write(tmp_path, "two.txt", "0.0.0.0 b.example\n*.c.example\n")
    allow = write(tmp_path, "allow.txt", "x.c.example\n")
    policy = DnsPolicy.from_files([one, str(two)], [allow])
    assert [policy.check(n).action for n in ["a.example", "b.example", "y.c.example"]] == [
        "block"
    ] * 3
    assert policy.check("x.c.example") == Verdict("pass", rule=f"allow:x.c.example ({allow}:1)")
    assert policy.check("y.c.example").rule == f"block:*.c.example ({two}:2)"
    assert len(policy) == 4


def test_duplicate_rules_count_once_and_keep_the_first_origin(tmp_path: Path) -> None:
    one = write(tmp_path, "one.txt", "a.example\nA.example.\n")
    two = write(tmp_path, "two.txt", "0.0.0.0 a.example\n")
    policy = DnsPolicy.from_files([one, two])
    assert len(policy) == 1
    assert policy.check("a.example").rule == f"block:a.example ({one}:1)"


def test_bad_lines_are_skipped_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long_label = "a" * 64
    long_name = ".".join(["a" * 50] * 5)  # 254 characters
    path = write(
        tmp_path,
        "block.txt",
        "good.example\n"
        "bad_chars!.example\n"  # '!' not after whitespace: part of the name, invalid
        f"{long_label}.example\n"
        f"{long_name}\n"
        "*\n"
        "*.\n"
        "ads*.example\n"
        "a..example\n"
        "||ads.example^$important\n"
        "two words\n"
        "0.0.0.0 ok.example bad/name.example\n"
        "1.2.3.4\n"
        "sp ace.example\n"
        "good2.example\n",
    )
    with caplog.at_level(logging.WARNING, logger="tunlwip.dns.policy"):
        policy = DnsPolicy.from_files([path])
    assert policy.skipped_lines == 12
    assert policy.check("good.example").action == "block"
    assert policy.check("good2.example").action == "block"
    assert policy.check("ok.example").action == "block"  # the valid name of a partly bad line
    assert len(policy) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(path) in message and "12 invalid lines" in message and "line 2" in message


def test_limits_on_label_and_name_length() -> None:
    label63 = "a" * 63
    name253 = ".".join([label63] * 3 + ["b" * 61])
    assert len(name253) == 253
    policy = DnsPolicy(blocked=[f"{label63}.example", name253, name253 + "b"])
    assert policy.skipped_lines == 1
    assert policy.check(f"{label63}.example").action == "block"
    assert policy.check(name253).action == "block"


def test_missing_or_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        DnsPolicy.from_files([missing])
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        DnsPolicy.from_files([], [tmp_path])  # a directory


def test_binary_garbage_does_not_stop_the_list(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_bytes(b"\xef\xbb\xbffirst.example\n\xff\xfe\x00junk\nlast.example\n")
    policy = DnsPolicy.from_files([path])
    assert policy.check("first.example").action == "block"  # the UTF-8 BOM is not part of it
    assert policy.check("last.example").action == "block"
    assert policy.skipped_lines == 1


# -- decision order ---------------------------------------------------------------------------


def test_allow_exception_beats_blocked_suffix() -> None:
    policy = DnsPolicy(blocked=["*.example"], allowed=["good.example", "*.fine.example"])
    assert policy.check("bad.example").action == "block"
    assert policy.check("example").action == "block"
    assert policy.check("good.example").action == "pass"
    assert policy.check("x.good.example").action == "block"  # exact allow rule only
    assert policy.check("x.fine.example").action == "pass"
    assert policy.check("fine.example").rule == "allow:*.fine.example"


def test_override_beats_allow_and_block() -> None:
    policy = DnsPolicy(
        blocked=["*.example"],
        allowed=["*.example"],
        overrides={"Home.Example.": ["192.0.2.1", "2001:db8::1"], "v4.example": "192.0.2.9"},
    )
    verdict = policy.check("home.example")
    assert verdict.action == "override"
    assert verdict.addresses == (
        ipaddress.IPv4Address("192.0.2.1"),
        ipaddress.IPv6Address("2001:db8::1"),
    )
    assert verdict.rule == "override:home.example"
    assert policy.check("v4.example").addresses == (ipaddress.IPv4Address("192.0.2.9"),)
    assert policy.check("x.home.example").action == "pass"  # overrides are exact
    assert len(policy) == 4


def test_no_rules_passes_everything() -> None:
    policy = DnsPolicy()
    assert policy.check("anything.example") == Verdict("pass")
    assert len(policy) == 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"a.example": ["not-an-ip"]}, "a.example"),
        ({"a.example": ["192.0.2.1", "300.1.1.1"]}, "a.example.*300"),
        ({"a.example": []}, "a.example"),
        ({"*.example": ["192.0.2.1"]}, "exact"),
        ({"bad name": ["192.0.2.1"]}, "bad name"),
    ],
)
def test_bad_override_is_a_config_error(overrides: dict[str, list[str]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DnsPolicy(overrides=overrides)


def test_override_accepts_address_objects() -> None:
    address = ipaddress.IPv6Address("2001:db8::5")
    policy = DnsPolicy.from_files(overrides={"a.example": [address]})
    assert policy.check("a.example").addresses == (address,)


def test_hundred_thousand_rules_load_and_check(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    with path.open("w") as f:
        for i in range(50_000):
            f.write(f"host{i}.ads.example\n0.0.0.0 h{i}.hosts.example\n")
    policy = DnsPolicy.from_files([path], overrides={"h7.hosts.example": ["192.0.2.7"]})
    assert len(policy) == 100_001
    assert policy.skipped_lines == 0
    for i in range(0, 50_000, 997):
        assert policy.check(f"host{i}.ads.example").action == "block"
        assert policy.check(f"H{i}.hosts.example.").action == "block"
        assert policy.check(f"x.host{i}.ads.example").action == "pass"
    assert policy.check("host50000.ads.example").action == "pass"
    assert policy.check("h7.hosts.example").action == "override"
    assert (
        policy.check("h49999.hosts.example").rule == f"block:h49999.hosts.example ({path}:100000)"
    )


labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10)
names = st.lists(labels, min_size=1, max_size=5).map(lambda ls: ".".join(ls) + ".test")


def oracle(exact: list[str], suffixes: list[str], name: str) -> bool:
    """The slow, obvious definition of a match: compare with every rule."""
    return name in exact or any(name == s or name.endswith("." + s) for s in suffixes)


@given(
    block_exact=st.lists(names, max_size=8),
    block_suffix=st.lists(names, max_size=8),
    allow_suffix=st.lists(names, max_size=4),
    name=names,
    prefix=st.lists(labels, max_size=3),
)
def test_check_agrees_with_checking_every_rule(
    block_exact: list[str],
    block_suffix: list[str],
    allow_suffix: list[str],
    name: str,
    prefix: list[str],
) -> None:
    policy = DnsPolicy(
        blocked=block_exact + ["*." + s for s in block_suffix],
        allowed=["||" + s + "^" for s in allow_suffix],
    )
    assert policy.skipped_lines == 0
    for candidate in [name, ".".join([*prefix, name]), *block_exact, *block_suffix]:
        candidate = ".".join([*prefix, candidate])
        blocked = oracle(block_exact, block_suffix, candidate) and not oracle(
            [], allow_suffix, candidate
        )
        assert policy.check(candidate).action == ("block" if blocked else "pass"), candidate
        assert policy.check(candidate.upper() + ".").action == policy.check(candidate).action


@given(st.text(max_size=300))
def test_any_line_or_name_never_crashes(text: str) -> None:
    policy = DnsPolicy(blocked=[text], allowed=text.splitlines())
    policy.check(text)
    policy.check(text.encode("utf-8", "replace").decode("ascii", "replace"))


# -- synthesized answers ----------------------------------------------------------------------


def make_query(
    name: str, rdtype: str, *, edns: bool = False, rd: bool = True
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
    query.id = 4242
    if not rd:
        query.flags &= ~dns.flags.RD
    return query


def roundtrip(message: dns.message.Message) -> dns.message.Message:
    return dns.message.from_wire(message.to_wire())


@pytest.mark.parametrize(
    ("how", "rcode"), [("nxdomain", dns.rcode.NXDOMAIN), ("refused", dns.rcode.REFUSED)]
)
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "MX"])
def test_blocked_nxdomain_and_refused(how: str, rcode: dns.rcode.Rcode, rdtype: str) -> None:
    query = make_query("Ads.Example.", rdtype, edns=True)
    response = roundtrip(blocked_response(query, how))  # type: ignore[arg-type]
    assert response.id == 4242
    assert response.rcode() == rcode
    assert response.question == query.question
    assert response.question[0].name.to_text() == "Ads.Example."
    assert not response.answer and not response.authority
    assert response.flags & dns.flags.QR and response.flags & dns.flags.RD
    assert response.flags & dns.flags.RA
    assert not response.flags & dns.flags.AA
    assert response.edns == 0


@pytest.mark.parametrize(("rdtype", "address"), [("A", "0.0.0.0"), ("AAAA", "::")])
def test_blocked_null_answers_the_null_address(rdtype: str, address: str) -> None:
    query = make_query("ads.example", rdtype, rd=False)
    response = roundtrip(blocked_response(query, "null"))
    assert response.rcode() == dns.rcode.NOERROR
    assert not response.flags & dns.flags.RD
    assert response.edns == -1
    [rrset] = response.answer
    assert rrset.name == query.question[0].name
    assert rrset.rdtype == dns.rdatatype.from_text(rdtype)
    assert rrset.ttl == 60
    assert [r.to_text() for r in rrset] == [address]


@pytest.mark.parametrize("rdtype", ["MX", "TXT", "HTTPS", "ANY"])
def test_blocked_null_other_types_get_nodata(rdtype: str) -> None:
    response = roundtrip(blocked_response(make_query("ads.example", rdtype), "null"))
    assert response.rcode() == dns.rcode.NOERROR
    assert not response.answer


def test_blocked_null_for_other_class_gets_nodata() -> None:
    query = dns.message.make_query("ads.example", "A", rdclass=dns.rdataclass.CH)
    assert not blocked_response(query, "null").answer


def test_blocked_response_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="nxdomain"):
        blocked_response(make_query("a.example", "A"), "drop")  # type: ignore[arg-type]


def test_override_response_answers_the_asked_family() -> None:
    addresses: list[IPAddress] = [
        ipaddress.IPv4Address("192.0.2.1"),
        ipaddress.IPv4Address("192.0.2.2"),
        ipaddress.IPv6Address("2001:db8::1"),
    ]
    a = roundtrip(override_response(make_query("home.example", "A", edns=True), addresses))
    assert a.id == 4242 and a.rcode() == dns.rcode.NOERROR and a.flags & dns.flags.RA
    assert a.edns == 0
    assert sorted(r.to_text() for r in a.answer[0]) == ["192.0.2.1", "192.0.2.2"]
    assert a.answer[0].ttl == 60
    aaaa = roundtrip(override_response(make_query("home.example", "AAAA"), addresses, ttl=300))
    assert [r.to_text() for r in aaaa.answer[0]] == ["2001:db8::1"]
    assert aaaa.answer[0].ttl == 300
    mx = override_response(make_query("home.example", "MX"), addresses)
    assert mx.rcode() == dns.rcode.NOERROR and not mx.answer
    only_v4 = override_response(make_query("home.example", "AAAA"), addresses[:1])
    assert only_v4.rcode() == dns.rcode.NOERROR and not only_v4.answer


# -- answers: CNAME chains ------------------------------------------------------------------


def chain_answer(qname: str, *records: tuple[str, str, str]) -> dns.message.Message:
    """An upstream's answer to ``qname A`` with (owner, type, rdata) records in that order."""
    response = dns.message.make_response(dns.message.make_query(qname, "A"))
    for owner, rdtype, text in records:
        response.answer.append(dns.rrset.from_text(owner, 300, "IN", rdtype, text))
    return response


def test_cname_to_a_blocked_name_blocks_the_answer() -> None:
    """CNAME cloaking: the question is innocent, its alias is a blocked tracker's."""
    policy = DnsPolicy(blocked=["||tracker.test^"])
    answer = chain_answer("metrics.shop.test.",
                          ("metrics.shop.test.", "CNAME", "shop.tracker.test."),
                          ("shop.tracker.test.", "A", "192.0.2.7"))  # fmt: skip
    verdict = policy.check_answer(answer)
    assert verdict.action == "block"
    assert verdict.rule == "cname:shop.tracker.test block:*.tracker.test"


def test_blocked_name_deep_in_a_chain_in_any_record_order() -> None:
    hops = [f"hop{i}.test." for i in range(20)]
    records = [
        (a, "CNAME", b) for a, b in zip(["www.test.", *hops], [*hops, "ads.test."], strict=True)
    ]
    records.append(("ads.test.", "A", "192.0.2.9"))
    policy = DnsPolicy(blocked=["ads.test"])
    assert policy.check_answer(chain_answer("www.test.", *records)).action == "block"
    assert policy.check_answer(chain_answer("www.test.", *reversed(records))).action == "block"
    assert DnsPolicy(blocked=["other.test"]).check_answer(
        chain_answer("www.test.", *records)).action == "pass"  # fmt: skip


def test_records_off_the_chain_are_ignored() -> None:
    """Only the chain from the question counts, as for the client: an unrelated CNAME to a
    blocked name (an upstream's stray record) does not block the answer."""
    policy = DnsPolicy(blocked=["ads.test"])
    answer = chain_answer("www.test.", ("www.test.", "A", "192.0.2.1"),
                          ("other.test.", "CNAME", "ads.test."))  # fmt: skip
    assert policy.check_answer(answer).action == "pass"


def test_cname_loop_ends_the_walk() -> None:
    policy = DnsPolicy(blocked=["ads.test"])
    answer = chain_answer("a.test.", ("a.test.", "CNAME", "b.test."),
                          ("b.test.", "CNAME", "a.test."))  # fmt: skip
    assert policy.check_answer(answer).action == "pass"


def test_dname_rewrite_to_a_blocked_suffix_blocks() -> None:
    policy = DnsPolicy(blocked=["||tracker.test^"])
    answer = chain_answer("x.cdn.shop.test.", ("cdn.shop.test.", "DNAME", "tracker.test."),
                          ("x.tracker.test.", "A", "192.0.2.3"))  # fmt: skip
    assert policy.check_answer(answer).action == "block"


def test_allowed_question_is_trusted_with_its_chain_but_allowed_hop_only_spares_itself() -> None:
    policy = DnsPolicy(blocked=["||tracker.test^", "ads.test"],
                       allowed=["shop.test", "ok.tracker.test"])  # fmt: skip
    to_tracker = chain_answer("shop.test.", ("shop.test.", "CNAME", "x.tracker.test."))
    assert policy.check_answer(to_tracker).action == "pass"
    via_allowed = chain_answer("www.test.", ("www.test.", "CNAME", "ok.tracker.test."),
                               ("ok.tracker.test.", "CNAME", "ads.test."))  # fmt: skip
    verdict = policy.check_answer(via_allowed)
    assert verdict.action == "block" and verdict.rule.startswith("cname:ads.test ")
    only_allowed = chain_answer("www.test.", ("www.test.", "CNAME", "ok.tracker.test."))
    assert policy.check_answer(only_allowed).action == "pass"


def test_answers_without_block_rules_or_chain_pass() -> None:
    answer = chain_answer("www.test.", ("www.test.", "CNAME", "ads.test."))
    assert DnsPolicy(allowed=["x.test"]).check_answer(answer).action == "pass"
    plain = chain_answer("www.test.", ("www.test.", "A", "192.0.2.1"))
    assert DnsPolicy(blocked=["ads.test"]).check_answer(plain).action == "pass"


_CHAIN_NAMES = ["a.test.", "b.test.", "x.ads.test.", "ads.test.", "c.ok.test.", "test."]


@given(
    st.lists(
        st.tuples(st.sampled_from(_CHAIN_NAMES), st.sampled_from(["CNAME", "DNAME", "A"]),
                  st.sampled_from(_CHAIN_NAMES)),
        max_size=12,
    ),
    st.sampled_from(_CHAIN_NAMES),
)  # fmt: skip
def test_any_answer_gets_a_verdict_that_matches_walking_the_chain(
    records: list[tuple[str, str, str]], qname: str
) -> None:
    """Whatever an upstream puts in the answer (loops, DNAMEs over their own targets, stray
    records), the walk ends, and blocks exactly when a name reached through CNAMEs from the
    question is blocked (checked here without DNAMEs, against a plain walk)."""
    policy = DnsPolicy(blocked=["||ads.test^"], allowed=["ok.test"])
    response = dns.message.make_response(dns.message.make_query(qname, "A"))
    for owner, rdtype, target in records:
        text = "192.0.2.1" if rdtype == "A" else target
        rrset = response.find_rrset(response.answer, dns.name.from_text(owner),
                                    dns.rdataclass.IN, dns.rdatatype.from_text(rdtype),
                                    create=True)  # fmt: skip
        rrset.add(dns.rdata.from_text("IN", rdtype, text), 300)
    verdict = policy.check_answer(response)
    assert verdict.action in ("pass", "block")
    if any(rdtype == "DNAME" for _, rdtype, _ in records):
        return
    aliases: dict[str, list[str]] = {}
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.CNAME:
            aliases.setdefault(rrset.name.to_text(), []).extend(rd.target.to_text() for rd in rrset)
    reached, stack = {qname}, [qname] if policy.check(qname).rule == "" else []
    while stack:
        for target in aliases.get(stack.pop(), []):
            if target not in reached:
                reached.add(target)
                stack.append(target)
    blocked = any(policy.check(n).action == "block" for n in reached - {qname})
    assert (verdict.action == "block") == blocked, (records, qname, verdict)
