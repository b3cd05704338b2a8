"""The administration pages as ``twisted.web.template`` tags: plain data in, markup out.

Every function here takes values the facade returned (no requests, no I/O) and builds
a tag tree; :func:`render_page` flattens it. The flattener escapes every text and
attribute, so nothing a user typed can become markup. No page has a script or an inline
style (the Content-Security-Policy forbids both): the look is :data:`STYLESHEET`, served
as ``/static/admin.css``, and every action is a plain HTML form.

Forms that change something are ``POST`` and carry the session's CSRF token
(:func:`post_form`); searching, paging and filtering are ``GET`` links and forms that
change nothing (and so carry no token, which would otherwise end up in URLs and logs).
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from twisted.web.template import Tag, flattenString, tags

from gatekeeper.admin.check import CheckReport, Step
from gatekeeper.admin.facade import (
    AuditPage,
    CertificateInfo,
    LookupTrace,
    SessionInfo,
    Stats,
    UserInfo,
    UserPage,
)
from gatekeeper.admin.web.activity import RELAY_OUTCOMES, relay_chart

__all__ = [
    "NAVIGATION",
    "STYLESHEET",
    "audit_page",
    "certificates_page",
    "delete_page",
    "error_page",
    "layout",
    "login_page",
    "lookup_page",
    "post_form",
    "render_page",
    "status_page",
    "user_page",
    "users_page",
]

NAVIGATION = (
    ("users", "Users"),
    ("certificates", "Certificates"),
    ("lookup", "Lookup"),
    ("status", "Status"),
    ("audit", "Audit"),
)

STYLESHEET = b"""\
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{display:flex;align-items:center;gap:1.5em;background:#263238;color:#fff;padding:.5em 1.5em}
header .brand{font-weight:bold;font-size:1.2em}
header nav a{color:#cfd8dc;margin-right:1em;text-decoration:none}
header nav a[aria-current=page]{color:#fff;border-bottom:2px solid #80cbc4}
header form{margin-left:auto}
main{padding:1em 1.5em;max-width:80em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;background:#fff;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#eceff1}
tr.ok td.result{background:#c8e6c9;color:#1b5e20;font-weight:bold}
tr.fail td.result{background:#ffcdd2;color:#b71c1c;font-weight:bold}
td.step-ok{color:#1b5e20}td.step-FAIL{color:#b71c1c;font-weight:bold}
.flash{padding:.6em 1em;margin:.5em 0;border-radius:4px}
.flash.ok{background:#e8f5e9;border:1px solid #66bb6a}
.flash.error{background:#ffebee;border:1px solid #e57373}
.note{color:#555;max-width:50em}
.warning{background:#fff8e1;border:1px solid #ffb300;padding:.6em 1em;max-width:50em}
form.inline{display:inline}
fieldset{border:1px solid #ccc;background:#fff;margin:.8em 0;max-width:50em}
label{display:block;margin:.3em 0}
input[type=text],input[type=password],input[type=search],select{padding:.25em;min-width:18em}
button{padding:.3em .9em;cursor:pointer}
button.danger{background:#c62828;color:#fff;border:1px solid #8e0000}
.pager a,.pager span{margin-right:.8em}
pre.trace{background:#fff;border:1px solid #ddd;padding:.8em;white-space:pre-wrap}
.counters td:last-child{text-align:right}
.decision{font-size:1.1em;font-weight:bold}
.found{color:#1b5e20}.notfound{color:#b71c1c}
svg.chart{background:#fff;border:1px solid #ddd}
.login{max-width:24em;margin:4em auto;background:#fff;border:1px solid #ddd;padding:1em 2em}
"""


async def render_page(tag: Tag) -> bytes:
    """The page as bytes: the HTML5 doctype, then the flattened tags."""
    body: bytes = await flattenString(None, tag)
    return b"<!DOCTYPE html>\n" + body


def _main(*children: Any, **attributes: Any) -> Tag:
    # twisted.web.template's tag list predates <main>.
    return Tag("main")(*children, **attributes)


def _when(moment: datetime.datetime | None, never: str = "never") -> str:
    if moment is None:
        return never
    return f"{moment.astimezone(datetime.UTC):%Y-%m-%d %H:%M} UTC"


def _date(moment: datetime.datetime) -> str:
    return f"{moment.astimezone(datetime.UTC):%Y-%m-%d}"


def _hidden(name: str, value: str) -> Tag:
    return tags.input(type="hidden", name=name, value=value)


def post_form(action: str, csrf: str, *children: Any, **attributes: Any) -> Tag:
    """A ``POST`` form to ``action`` carrying the CSRF token (``csrf``)."""
    return tags.form(method="post", action=action, **attributes)(_hidden("csrf", csrf), *children)


def _field(label: str, name: str, kind: str = "text", **attributes: Any) -> Tag:
    return tags.label(label, " ", tags.input(type=kind, name=name, **attributes))


def _password(label: str, name: str, *, required: bool = True, new: bool = False) -> Tag:
    extra: dict[str, str] = {"autocomplete": "new-password" if new else "off"}
    if required:
        extra["required"] = "required"
    return _field(label, name, "password", maxlength="1024", **extra)


def _flashes(flashes: Sequence[tuple[str, str]]) -> list[Tag]:
    return [
        tags.div(text, class_=f"flash {kind}", role="alert" if kind == "error" else "status") for kind, text in flashes
    ]


def _link(path: str, **query: Any) -> str:
    wanted = {key: value for key, value in query.items() if value not in (None, "", 0)}
    return f"{path}?{urlencode(wanted)}" if wanted else path


def layout(
    title: str,
    current: str,
    content: Sequence[Any],
    *,
    admin: str,
    csrf: str,
    hostname: str,
    flashes: Sequence[tuple[str, str]] = (),
) -> Tag:
    """The frame of every page after the login: navigation, the logout button, messages, content."""
    links = []
    for name, label in NAVIGATION:
        attributes = {"aria-current": "page"} if name == current else {}
        links.append(tags.a(label, href=f"/{name}", **attributes))
    header = tags.header(
        tags.span("Gatekeeper", class_="brand"),
        tags.span(hostname, class_="host"),
        tags.nav(*links),
        post_form("/logout", csrf, tags.span(admin, " "), tags.button("Log out", type="submit")),
    )
    return _document(title, header, _main(tags.h1(title), *_flashes(flashes), *content))


def _document(title: str, *body: Any) -> Tag:
    return tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{title} - Gatekeeper"),
            tags.link(rel="stylesheet", href="/static/admin.css"),
        ),
        tags.body(*body),
    )


# -- the login -------------------------------------------------------------------------------


def login_page(csrf: str, *, hostname: str, message: tuple[str, str] | None = None, name: str = "") -> Tag:
    """The login form (``csrf``: the login token of :func:`~gatekeeper.admin.web.sessions.login_token`)."""
    form = post_form(
        "/login",
        csrf,
        _field("Name", "name", value=name, required="required", autocomplete="username", maxlength="64"),
        tags.label("Password ", tags.input(type="password", name="password", required="required", maxlength="1024")),
        tags.button("Log in", type="submit"),
    )
    flashes = _flashes([message]) if message else []
    return _document(
        "Log in",
        _main(class_="login")(tags.h1("Gatekeeper administration"), tags.p(hostname, class_="note"), *flashes, form),
    )


def error_page(status: int, title: str, text: str) -> Tag:
    """A page for a refused or failed request: a title, a sentence, a way back."""
    return _document(
        title,
        _main(tags.h1(title), tags.p(text), tags.p(tags.a("Back to the users", href="/users")), class_="login"),
    )


# -- users -----------------------------------------------------------------------------------


def users_page(page: UserPage, query: str, csrf: str) -> list[Any]:
    """The users list: search, one page of users, the pager and the form to add a user."""
    search = tags.form(method="get", action="/users", role="search")(
        tags.label(
            "Search addresses ",
            tags.input(type="search", name="q", value=query, maxlength="254"),
            " ",
            tags.button("Search", type="submit"),
        )
    )
    first, last = page.offset + 1, page.offset + len(page.users)
    if page.total == 0:
        summary = tags.p("No user matches." if query else "There are no users yet.")
    else:
        summary = tags.p(f"Users {first}-{last} of {page.total}" + (f" matching \u201c{query}\u201d" if query else ""))
    rows = [
        tags.tr(
            tags.td(tags.a(user.address, href=_link("/user", address=user.address))),
            tags.td(_date(user.certificate_expires)),
            tags.td(str(user.keys) + (f" (+{user.pending} pending)" if user.pending else "")),
            tags.td(_when(user.last_login)),
        )
        for user in page.users
    ]
    table = tags.table(
        tags.thead(tags.tr(tags.th("Address"), tags.th("Certificate expires"), tags.th("Keys"), tags.th("Last login"))),
        tags.tbody(*rows),
        id="users",
    )
    add = tags.fieldset(
        tags.legend("Add a user"),
        post_form(
            "/users/add",
            csrf,
            _field("Address", "address", required="required", maxlength="254", autocomplete="off"),
            _password("Initial password", "password", new=True),
            _password("Repeat the password", "confirm", new=True),
            tags.p(
                "A new key pair and certificate are made; the private key is encrypted under this password, "
                "which the user logs in to the gateway with.",
                class_="note",
            ),
            tags.button("Add user", type="submit"),
        ),
    )
    return [search, summary, table, _pager(page, query), add]


def _pager(page: UserPage, query: str) -> Tag:
    size = page.limit
    pages = max(1, -(-page.total // size))
    current = page.offset // size + 1
    items: list[Any] = []

    def link(label: str, number: int) -> Tag:
        return tags.a(label, href=_link("/users", q=query, page=number if number > 1 else None))

    if current > 1:
        items += [link("\u00ab first", 1), link("\u2039 previous", current - 1)]
    items.append(tags.span(f"page {current} of {pages}"))
    if current < pages:
        items += [link("next \u203a", current + 1), link("last \u00bb", pages)]
    return tags.p(*items, class_="pager")


def user_page(user: UserInfo, csrf: str) -> list[Any]:
    """One user: the summary, downloads, password, rotation and deletion."""
    address = user.address
    summary = tags.table(
        tags.tbody(
            tags.tr(tags.th("Address"), tags.td(address)),
            tags.tr(tags.th("Current key"), tags.td(user.key_id)),
            tags.tr(tags.th("Certificate expires"), tags.td(_date(user.certificate_expires))),
            tags.tr(tags.th("Keys"), tags.td(str(user.keys))),
            tags.tr(tags.th("Pending rotations"), tags.td(str(user.pending))),
            tags.tr(tags.th("Created"), tags.td(_when(user.created))),
            tags.tr(tags.th("Last login"), tags.td(_when(user.last_login))),
        ),
        id="user",
    )
    downloads = [
        tags.h2("Downloads"),
        tags.p(
            tags.a("Download the certificate (PEM)", href=_link("/user/certificate", address=address), download=""),
            class_="note",
        ),
        tags.fieldset(
            tags.legend("Download the private key as PKCS#12"),
            post_form(
                "/user/pkcs12",
                csrf,
                _hidden("address", address),
                _password("The user's password (decrypts the key)", "password"),
                _password("A password to protect the file", "export_password", new=True),
                _password("Repeat it", "export_confirm", new=True),
                tags.label(
                    tags.input(type="checkbox", name="legacy", value="1"), " Legacy format (3DES, for old importers)"
                ),
                tags.button("Download .p12", type="submit"),
            ),
        ),
    ]
    password = [
        tags.h2("Password"),
        tags.fieldset(
            tags.legend("Change the password (the current one is known)"),
            post_form(
                "/user/password",
                csrf,
                _hidden("address", address),
                _password("Current password", "old_password"),
                _password("New password", "password", new=True),
                _password("Repeat the new password", "confirm", new=True),
                tags.p("Every key is re-encrypted under the new password; nothing else changes.", class_="note"),
                tags.button("Change password", type="submit"),
            ),
        ),
        tags.fieldset(
            tags.legend("Reset the password (the current one is lost)"),
            post_form(
                "/user/reset",
                csrf,
                _hidden("address", address),
                tags.p(
                    "Without the current password the user's private keys cannot be re-encrypted. "
                    "Resetting issues a NEW key pair under the new password, deletes the old keys and revokes "
                    "their certificates: mail encrypted to the old keys can no longer be read through the gateway.",
                    class_="warning",
                ),
                _password("New password", "password", new=True),
                _password("Repeat the new password", "confirm", new=True),
                tags.label(
                    tags.input(type="checkbox", name="understood", value="1", required="required"),
                    " I understand that the old keys are deleted",
                ),
                tags.button("Reset with a new key pair", type="submit", class_="danger"),
            ),
        ),
    ]
    rotate = [
        tags.h2("Key pair"),
        tags.fieldset(
            tags.legend("Rotate: a new key pair and certificate"),
            post_form(
                "/user/rotate",
                csrf,
                _hidden("address", address),
                _password("The user's password (optional)", "password", required=False),
                tags.p(
                    "Old keys are kept for old mail. With the password the new key is sealed now; without it "
                    "the new key is completed at the user's next login. Its certificate is published at once.",
                    class_="note",
                ),
                tags.button("Rotate", type="submit"),
            ),
        ),
        tags.h2("Delete"),
        tags.p(tags.a("Delete this user\u2026", href=_link("/user/delete", address=address))),
    ]
    return [summary, *downloads, *password, *rotate]


def delete_page(user: UserInfo, csrf: str) -> list[Any]:
    """The confirmation before deleting a user: type the address."""
    return [
        tags.p(
            f"Deleting {user.address} revokes its {user.keys + user.pending} certificate(s), deletes its private keys "
            "and closes its sessions. Mail encrypted to it can no longer be read through the gateway.",
            class_="warning",
        ),
        post_form(
            "/user/delete",
            csrf,
            _hidden("address", user.address),
            _field("Type the address to confirm", "confirm", required="required", autocomplete="off"),
            tags.button("Delete the user", type="submit", class_="danger"),
            " ",
            tags.a("Cancel", href=_link("/user", address=user.address)),
        ),
    ]


# -- certificates --------------------------------------------------------------------------------


def certificates_page(certificates: Sequence[CertificateInfo], csrf: str, max_upload: int) -> list[Any]:
    """The key ring: the import form and every certificate with its remove button."""
    upload = tags.fieldset(
        tags.legend("Import certificates"),
        post_form(
            "/certificates/import",
            csrf,
            tags.label(
                "A PEM, DER or PKCS#7 (.p7c/.p7b) file ",
                tags.input(type="file", name="file", required="required", accept=".pem,.crt,.cer,.der,.p7c,.p7b"),
            ),
            tags.p(f"At most {max_upload // 1024} KiB.", class_="note"),
            tags.button("Import", type="submit"),
            enctype="multipart/form-data",
        ),
    )
    rows = [
        tags.tr(
            tags.td(tags.code(info.fingerprint[:16] + "\u2026", title=info.fingerprint)),
            tags.td(", ".join(info.addresses) or "-"),
            tags.td(info.subject or "-"),
            tags.td(info.issuer),
            tags.td(_date(info.not_after)),
            tags.td(info.origin),
            tags.td(_when(info.added, "-")),
            tags.td(
                post_form(
                    "/certificates/remove",
                    csrf,
                    _hidden("fingerprint", info.fingerprint),
                    tags.button("Remove", type="submit"),
                    class_="inline",
                )
            ),
        )
        for info in certificates
    ]
    table = tags.table(
        tags.thead(
            tags.tr(
                *(tags.th(h) for h in ("SHA-256", "Addresses", "Subject", "Issuer", "Expires", "Origin", "Added", ""))
            )
        ),
        tags.tbody(*rows),
        id="certificates",
    )
    count = tags.p(f"{len(certificates)} certificate(s) in the key ring." if certificates else "The key ring is empty.")
    return [upload, count, table]


# -- lookup --------------------------------------------------------------------------------------


def lookup_page(csrf: str, address: str = "", trace: LookupTrace | None = None) -> list[Any]:
    """The lookup form and, after a lookup, the decision and every source's answer."""
    form = post_form(
        "/lookup",
        csrf,
        _field("Address", "address", value=address, required="required", maxlength="254"),
        tags.label(tags.input(type="checkbox", name="cached", value="1"), " through the gateway's lookup cache"),
        tags.button("Look up", type="submit"),
    )
    content: list[Any] = [
        tags.p("Asks the key sources in order, as outbound mail would, and shows what each answered.", class_="note"),
        form,
    ]
    if trace is not None:
        decision = trace.lines[-1] if trace.lines else ""
        for line in trace.lines:
            if line.startswith("Decision:"):
                decision = line
        content += [
            tags.h2(f"Result for {trace.result.address}"),
            tags.p(decision, class_="decision " + ("found" if trace.found else "notfound"), id="decision"),
            tags.pre("\n".join(trace.lines), class_="trace", id="trace"),
        ]
    return content


# -- status ---------------------------------------------------------------------------------------


def _step_cell(step: Step) -> Tag:
    return tags.td(str(step), class_=f"step-{step.value}")


def status_page(
    *,
    csrf: str,
    report: CheckReport | None,
    checked: datetime.datetime | None,
    sessions: Sequence[SessionInfo],
    stats: Stats,
    relays: list[tuple[int, Counter[str]]],
    logins: Counter[str],
) -> list[Any]:
    """Connectivity (refreshed on demand), sessions, counters and the relay chart."""
    check_form = post_form("/status/check", csrf, tags.button("Check now", type="submit"), class_="inline")
    if report is None:
        check: list[Any] = [tags.p("Not checked yet since the gateway started. ", check_form)]
    else:
        rows = []
        for row in report.rows:
            rtt = "-" if row.rtt is None else f"{row.rtt * 1000:.1f} ms"
            rows.append(
                tags.tr(class_="ok" if row.ok else "fail")(
                    tags.td(row.name),
                    tags.td(row.target),
                    _step_cell(row.reach),
                    _step_cell(row.tls),
                    _step_cell(row.login),
                    tags.td(rtt),
                    tags.td("ok" if row.ok else "FAIL", class_="result"),
                    tags.td(row.detail),
                )
            )
        headers = ("Check", "Target", "Reach", "TLS", "Login", "RTT", "Result", "Detail")
        check = [
            tags.p(f"Checked {_when(checked)}: {report.verdict} ", check_form, id="verdict"),
            tags.table(tags.thead(tags.tr(*(tags.th(h) for h in headers))), tags.tbody(*rows), id="checks"),
        ]
    session_rows = [
        tags.tr(
            tags.td(str(s.session)),
            tags.td(s.user),
            tags.td(s.protocol),
            tags.td(s.client),
            tags.td(_when(s.since)),
            tags.td(
                post_form(
                    "/status/kick",
                    csrf,
                    _hidden("session", str(s.session)),
                    tags.button("Disconnect", type="submit"),
                    class_="inline",
                )
            ),
        )
        for s in sessions
    ]
    session_table = (
        tags.table(
            tags.thead(tags.tr(*(tags.th(h) for h in ("#", "User", "Protocol", "Client", "Since", "")))),
            tags.tbody(*session_rows),
            id="sessions",
        )
        if sessions
        else tags.p("No one is logged in.")
    )
    relay_totals = sum((counts for _, counts in relays), Counter())
    counters = [
        ("Sessions", ", ".join(f"{p} {n}" for p, n in stats.sessions.items()) or "0"),
        ("Messages relayed, last hour", str(sum(relay_totals.values()))),
        *((f"\u2003{o.replace('_', ' ')}", str(relay_totals[o])) for o in RELAY_OUTCOMES if relay_totals[o]),
        ("Logins, last hour", ", ".join(f"{o} {n}" for o, n in sorted(logins.items())) or "0"),
        ("Users with unlocked keys cached", str(stats.unlocked_users)),
        ("Lookup cache: entries", str(stats.lookup_cache_entries)),
        ("Lookup cache: hits / misses", f"{stats.lookup_cache_hits} / {stats.lookup_cache_misses}"),
        ("Worker processes / jobs queued", f"{stats.worker_processes} / {stats.worker_queue}"),
    ]
    counter_table = tags.table(
        tags.tbody(*(tags.tr(tags.th(name), tags.td(value)) for name, value in counters)),
        class_="counters",
        id="counters",
    )
    return [
        tags.h2("Connectivity"),
        *check,
        tags.h2("Messages per minute, last hour"),
        tags.figure(relay_chart(relays), id="chart"),
        tags.h2("Counters"),
        counter_table,
        tags.h2("Sessions"),
        session_table,
        tags.p(tags.a("Refresh", href="/status")),
    ]


# -- audit ---------------------------------------------------------------------------------------

AUDIT_EVENTS = ("", "admin", "key_use")
AUDIT_OPERATIONS = (
    "",
    "add_user",
    "passwd",
    "reset_password",
    "rotate",
    "delete_user",
    "export",
    "import_cert",
    "remove_cert",
    "flush",
    "kick",
    "add_admin",
    "remove_admin",
    "set_upstream_login",
    "clear_upstream_login",
    "unlock",
    "sign",
    "decrypt",
)
AUDIT_COLUMNS = ("seq", "time", "event", "operation", "user", "target", "actor", "via", "session", "peer")


def _select(name: str, label: str, choices: Sequence[str], chosen: str) -> Tag:
    options = []
    for choice in choices:
        attributes = {"selected": "selected"} if choice == chosen else {}
        options.append(tags.option(choice or "any", value=choice, **attributes))
    return tags.label(label, " ", tags.select(*options, name=name))


def audit_page(page: AuditPage, *, query: str, event: str, operation: str, limit: int) -> list[Any]:
    """The audit log, newest first, with its filter form and paging."""
    form = tags.form(method="get", action="/audit", role="search")(
        tags.label("Text ", tags.input(type="search", name="q", value=query, maxlength="254")),
        _select("event", "Event", AUDIT_EVENTS, event),
        _select("operation", "Operation", AUDIT_OPERATIONS, operation),
        tags.button("Filter", type="submit"),
    )
    rows = [
        tags.tr(*(tags.td("" if record.fields.get(c) is None else str(record.fields.get(c))) for c in AUDIT_COLUMNS))
        for record in page.records
    ]
    table = tags.table(
        tags.thead(tags.tr(*(tags.th(c) for c in AUDIT_COLUMNS))),
        tags.tbody(*rows),
        id="audit",
    )
    pager: list[Any] = []
    if page.offset > 0:
        newer = max(0, page.offset - limit)
        pager.append(
            tags.a("\u2039 newer", href=_link("/audit", q=query, event=event, operation=operation, offset=newer))
        )
    if page.more:
        older = page.offset + limit
        pager.append(
            tags.a("older \u203a", href=_link("/audit", q=query, event=event, operation=operation, offset=older))
        )
    notes = []
    if page.truncated:
        notes.append(
            tags.p(f"Searched the newest {page.scanned} records only; narrow the filter for older ones.", class_="note")
        )
    if not page.records:
        notes.append(tags.p("No record matches."))
    return [
        form,
        *notes,
        table,
        tags.p(*pager, class_="pager"),
        tags.p("`gatekeeper audit verify` checks the log's hash chain.", class_="note"),
    ]
