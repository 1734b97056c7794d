"""``--bypass-exclude`` rules: which of a ``run --bypass`` program's TCP connects keep the
namespace's own path instead of being switched, parsed and matched (sans-IO).

Why a program needs them: a switched socket is the host's, so the program's own
address (``getsockname``) is the host's, not the namespace's.  Protocols that write
their own address into the stream and expect the peer to come back to it (FTP active
mode's ``PORT``/``EPRT``, SIP's ``Via``/``Contact``) then announce an address that
means something else.  An excluded connect is made on the program's own socket in the
namespace, so it takes the fast path like any connect without ``--bypass``.

Exclusion never decides anything: the switcher asks the policy first and a denied
destination is refused whether a rule names it or not; the fast path then decides the
excluded connection again, as it decides every one.  A rule only picks the path.

The grammar is the policy's (:mod:`.rules`), for TCP: ``NETWORK``, ``HOST:PORT``,
``NETWORK:PORT-PORT``, ``[IPv6NET]:PORT``, ``*:PORT`` (both families), with an optional
``tcp:`` in front; plus a bare ``PORT`` or ``PORT-PORT``, short for ``*:PORT``.  Only TCP
connects are ever switched, so ``udp:``/``icmp:`` and a rule matching everything
(``*``, which would turn switching off) are refused with the forms that are accepted.
"""

from __future__ import annotations

from collections.abc import Iterable

from nsbridge.errors import UserError
from nsbridge.usernet.proto.addresses import IPAddress
from nsbridge.usernet.proto.rules import RULE_EXAMPLES, Rule

OPTION = "--bypass-exclude"
FORMS = ("NETWORK, HOST:PORT, NETWORK:PORT-PORT, [IPv6]:PORT, *:PORT or PORT[-PORT], "
         "e.g. 192.0.2.0/24, 192.0.2.1:21, [2001:db8::1]:5060, *:21, 5060-5061")


def parse_exclude(text: str) -> Rule:
    """One ``--bypass-exclude`` rule; a :class:`UserError` (one line) names the rule and
    the accepted forms."""
    shown = text if text and text.isprintable() and " " not in text else repr(text)
    spelled = f"*:{text}" if _is_ports(text) else text
    head, colon, _rest = spelled.partition(":")
    if colon and head.lower() in ("udp", "icmp"):
        raise UserError(f"{OPTION} {shown}: only TCP connects are switched, so only TCP "
                        f"can be excluded; give {FORMS}")
    try:
        rule = Rule.parse("allow", spelled, what=OPTION)
    except UserError as exc:
        # the policy's own examples name udp rules: ours follow instead
        message = str(exc).replace(f" ({RULE_EXAMPLES})", "")
        if spelled != text:  # the error quotes our spelling; quote the user's
            message = message.replace(f"{OPTION} {spelled}", f"{OPTION} {shown}", 1)
        raise UserError(f"{message}; {OPTION} takes {FORMS}") from None
    if rule.network is None and rule.ports is None:
        raise UserError(f"{OPTION} {shown}: excludes every connect (that is running "
                        f"without --bypass); give {FORMS}")
    return rule


def _is_ports(text: str) -> bool:
    low, dash, high = text.partition("-")
    return bool(low) and low.isascii() and low.isdigit() and \
        (not dash or (high.isascii() and high.isdigit()))


class ExcludeRules:
    """The rules of one run; :meth:`match` names the first that covers a connect."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules = tuple(rules)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> ExcludeRules:
        return cls(parse_exclude(text) for text in texts)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, port: int, *addresses: IPAddress) -> Rule | None:
        """The first rule covering a TCP connect to ``port`` at any of ``addresses``
        (the address as the program asked, and its IPv4 reading for ``::ffff:a.b.c.d``
        on an IPv6 socket), or None: the connect is switched."""
        for rule in self.rules:
            if any(rule.matches("tcp", address, port) for address in addresses):
                return rule
        return None

    @staticmethod
    def describe(rule: Rule) -> str:
        """A rule as the user may write it again (``tcp:192.0.2.1/32:21``)."""
        return str(rule).split(" ", 1)[1]


NO_EXCLUDE = ExcludeRules()
