"""The administration site: requests in, facade calls, pages out.

:class:`WebAdmin` holds the state (sessions, the login throttle, the last connectivity
check) and answers every request of :class:`AdminSite` through one coroutine,
:meth:`WebAdmin.handle`, which

1. sets the security headers (:data:`SECURITY_HEADERS`: a CSP without scripts or inline
   styles and ``frame-ancestors 'none'``, ``no-referrer``, HSTS, ``nosniff``,
   ``no-store``) on every answer, errors included;
2. finds the route; every page but the login needs a live session, otherwise the
   browser is sent to ``/login``;
3. for a ``POST``, refuses a body over :data:`MAX_BODY` (read and dropped by
   :class:`AdminRequest`, never buffered), a foreign ``Origin`` and a missing or wrong
   CSRF token (403);
4. calls the handler, which calls the facade (:class:`~gatekeeper.admin.facade.Gatekeeper`
   acting as the logged-in administrator "via web": the same code as the CLI and the
   console, audited the same way);
5. turns a :class:`~gatekeeper.errors.GatekeeperError` (bad address, duplicate user,
   not a certificate, wrong password ...) into a message on the page, and anything
   else into a plain 500 page: never a traceback (the log has it).

A change answers with a redirect to a page that shows its outcome (post/redirect/get),
so reloading a page never repeats an action.
"""

from __future__ import annotations

import datetime
import io
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from gatekeeper.admin.check import CheckReport
from gatekeeper.admin.facade import Gatekeeper
from gatekeeper.admin.web import pages
from gatekeeper.admin.web.activity import Activity
from gatekeeper.admin.web.admins import AdminAccounts, AdminError, check_login
from gatekeeper.admin.web.sessions import AdminSession, SessionStore, login_token, tokens_match
from gatekeeper.connections import Connections
from gatekeeper.errors import BadPassword, GatekeeperError
from gatekeeper.events import emit
from gatekeeper.throttle import LoginThrottle

__all__ = [
    "LOGIN_COOKIE",
    "MAX_BODY",
    "MAX_UPLOAD",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "AdminRequest",
    "AdminSite",
    "Response",
    "WebAdmin",
]

log = Logger()

SESSION_COOKIE = "__Host-gk_admin"
LOGIN_COOKIE = "__Host-gk_login"
MAX_UPLOAD = 1024 * 1024  # a certificate bundle is a few KB; a MiB is generous
MAX_BODY = MAX_UPLOAD + 64 * 1024  # the upload plus the form's other fields and multipart framing
MAX_FIELD = 4096
USERS_PER_PAGE = 50
AUDIT_PER_PAGE = 100
CHECK_TIMEOUT = 10.0
LOGIN_COOKIE_SECONDS = 3600

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Strict-Transport-Security": "max-age=31536000",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Server": "Gatekeeper",
}

_BARE_ERROR = b"The request failed; the gateway's log has the details.\n"
_FILENAME_RE = re.compile(r"[^A-Za-z0-9@._+-]")


class AdminRequest(Request):
    """A request whose body is refused, unread into memory, beyond :data:`MAX_BODY` bytes.

    The bytes of a too-large body are read from the connection and dropped; the handler
    sees :attr:`body_too_large` and says so on the page.
    """

    max_body = MAX_BODY
    body_too_large = False

    def gotLength(self, length: int | None) -> None:
        """Refuse a declared length over the limit before reading anything."""
        if length is not None and length > self.max_body:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Keep the body while it is within the limit (a chunked body has no declared length)."""
        if self.body_too_large:
            return
        content = self.content
        assert content is not None  # gotLength made it
        if content.tell() + len(data) > self.max_body:
            self.body_too_large = True
            content.close()
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)


class _TrackedChannel(http.HTTPChannel):
    """An HTTP connection registered with the site's open connections (closed when the gateway stops)."""

    site: AdminSite

    def connectionMade(self) -> None:
        """Register, then serve."""
        self.site.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """Clean up, then unregister."""
        super().connectionLost(reason)
        self.site.connections.remove(self)


class AdminSite(Site):
    """The administration site: :class:`AdminRequest`, tracked connections, no tracebacks."""

    requestFactory = AdminRequest
    protocol = _TrackedChannel  # type: ignore[assignment]  # HTTP/1.1 only, registered
    displayTracebacks = False
    noisy = False

    def __init__(self, admin: WebAdmin, *, reactor: Any) -> None:
        super().__init__(_AdminResource(admin), timeout=120, reactor=reactor)
        self.admin = admin
        self.connections = Connections()


class _AdminResource(Resource):
    isLeaf = True

    def __init__(self, admin: WebAdmin) -> None:
        super().__init__()
        self.admin = admin

    def render(self, request: Request) -> int:
        """Answer asynchronously through :meth:`WebAdmin.handle`."""
        Deferred.fromCoroutine(self.admin.handle(request))
        return NOT_DONE_YET


@attrs.frozen
class Response:
    """What a handler answers: a status, a body, its type and extra headers."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def redirect(location: str) -> Response:
    """A ``303 See Other`` to ``location`` (after a form: the browser then GETs it)."""
    return Response(303, b"", headers=(("Location", location),))


def _link(path: str, **query: str) -> str:
    return f"{path}?{urlencode(query)}" if query else path


def _message(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text[:1].upper() + text[1:]


class _Refused(Exception):
    """A request refused before its handler ran (status and the sentence to show)."""

    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.title = title
        self.text = text


@attrs.frozen
class _Route:
    handler: Callable[[Request, AdminSession | None], Awaitable[Response]]
    session: bool = True
    back: str = "/users"  # where a refused upload is sent back to


class WebAdmin:
    """The web administration: routes, sessions, login and the pages' data.

    ``gk`` is the facade (each request uses ``gk.acting_as(NAME, "web")``), ``workers``
    runs the admins' password KDF (``message_workers``), ``admins`` is the
    administrators' file, ``activity`` the per-minute counters of the status chart.
    """

    def __init__(
        self,
        gk: Gatekeeper,
        *,
        workers: Any,
        admins: Path,
        clock: IReactorTime,
        hostname: str,
        activity: Activity,
        throttle: LoginThrottle,
        idle_seconds: float = 900.0,
    ) -> None:
        self.gk = gk
        self.workers = workers
        self.admins = AdminAccounts(admins)
        self.clock = clock
        self.hostname = hostname
        self.activity = activity
        self.throttle = throttle
        self.sessions = SessionStore(clock, idle_seconds=idle_seconds)
        self.login_key = secrets.token_bytes(32)
        self.report: CheckReport | None = None
        self.checked: datetime.datetime | None = None
        self._check_waiters: list[Deferred[CheckReport]] | None = None
        self._admin_names: tuple[int, frozenset[str]] | None = None
        self.routes: dict[tuple[str, str], _Route] = {
            ("GET", "/"): _Route(self.get_root),
            ("GET", "/login"): _Route(self.get_login, session=False),
            ("POST", "/login"): _Route(self.post_login, session=False),
            ("POST", "/logout"): _Route(self.post_logout),
            ("GET", "/users"): _Route(self.get_users),
            ("POST", "/users/add"): _Route(self.post_add_user),
            ("GET", "/user"): _Route(self.get_user),
            ("POST", "/user/password"): _Route(self.post_password),
            ("POST", "/user/reset"): _Route(self.post_reset),
            ("POST", "/user/rotate"): _Route(self.post_rotate),
            ("GET", "/user/delete"): _Route(self.get_delete),
            ("POST", "/user/delete"): _Route(self.post_delete),
            ("POST", "/user/pkcs12"): _Route(self.post_pkcs12),
            ("GET", "/user/certificate"): _Route(self.get_certificate),
            ("GET", "/certificates"): _Route(self.get_certificates),
            ("POST", "/certificates/import"): _Route(self.post_import, back="/certificates"),
            ("POST", "/certificates/remove"): _Route(self.post_remove, back="/certificates"),
            ("GET", "/lookup"): _Route(self.get_lookup),
            ("POST", "/lookup"): _Route(self.post_lookup, back="/lookup"),
            ("GET", "/status"): _Route(self.get_status),
            ("POST", "/status/check"): _Route(self.post_check, back="/status"),
            ("POST", "/status/kick"): _Route(self.post_kick, back="/status"),
            ("GET", "/audit"): _Route(self.get_audit),
            ("GET", "/static/admin.css"): _Route(self.get_stylesheet, session=False),
        }

    # -- the request cycle ------------------------------------------------------------------

    async def handle(self, request: Request) -> None:
        """Answer ``request`` (never raises; an unexpected error becomes a plain 500 page)."""
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        try:
            response = await self._dispatch(request)
        except _Refused as refused:
            response = await self._error(refused.status, refused.title, refused.text)
        except Exception:
            log.failure(
                "web administration: unexpected error answering {method} {path}",
                method=request.method,
                path=request.path,
            )
            response = await self._error(
                500, "Something went wrong", "The request failed unexpectedly; the gateway's log has the details."
            )
        if finished:  # the browser went away meanwhile
            return
        request.setResponseCode(response.status)
        request.setHeader("Content-Type", response.content_type)
        for name, value in response.headers:
            request.setHeader(name, value)
        request.setHeader("Content-Length", str(len(response.body)))
        if request.method != b"HEAD":
            request.write(response.body)
        request.finish()

    async def _error(self, status: int, title: str, text: str) -> Response:
        try:
            return Response(status, await pages.render_page(pages.error_page(status, title, text)))
        except Exception:
            log.failure("web administration: cannot render an error page")
            return Response(status, _BARE_ERROR, "text/plain; charset=utf-8")

    async def _dispatch(self, request: Request) -> Response:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        route = self.routes.get(("GET" if method == "HEAD" else method, path))
        if route is None:
            if any(known == path for _, known in self.routes):
                raise _Refused(405, "Not allowed", f"{method} is not used on {path}.")
            raise _Refused(404, "Not found", "There is no such page.")
        session = None
        if route.session:
            session = self._session(request)
            if session is None:
                return redirect("/login?ended=1" if request.getCookie(SESSION_COOKIE.encode()) else "/login")
        if method == "POST":
            self._check_origin(request)
            if getattr(request, "body_too_large", False):
                if session is None:
                    raise _Refused(413, "Too large", "The request is larger than this page accepts.")
                session.flash("error", f"The upload is too large: at most {MAX_UPLOAD // 1024} KiB is accepted.")
                return redirect(route.back)
            if session is not None and not tokens_match(self._arg(request, "csrf"), session.csrf):
                raise _Refused(
                    403,
                    "Form refused",
                    "The form's security token is missing or out of date, so nothing was done. "
                    "Reload the page and try again.",
                )
        return await route.handler(request, session)

    def _check_origin(self, request: Request) -> None:
        """Refuse a form that a browser says came from another site (on top of SameSite and the token).

        Under ``Referrer-Policy: no-referrer`` browsers send ``Origin: null`` with forms,
        so ``Sec-Fetch-Site`` is what tells; a foreign ``Origin`` is refused too.
        """
        refused = _Refused(403, "Form refused", "The form was sent from another site, so nothing was done.")
        fetch_site = request.getHeader("sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            raise refused
        origin = request.getHeader("origin")
        if origin is None or origin == "null":
            return
        host = request.getHeader("host") or ""
        parts = urlsplit(origin)
        if parts.scheme != "https" or parts.netloc.lower() != host.lower():
            raise refused

    def _session(self, request: Request) -> AdminSession | None:
        token = request.getCookie(SESSION_COOKIE.encode())
        session = self.sessions.get(token.decode("ascii", "replace") if token else None)
        if session is not None and session.name not in self._current_admins():
            self.sessions.end_all(session.name)  # removed by `gatekeeper admin remove`
            return None
        return session

    def _current_admins(self) -> frozenset[str]:
        """The administrators' names, re-read when the file changed."""
        try:
            stamp = self.admins.path.stat().st_mtime_ns
        except OSError:
            return frozenset()
        if self._admin_names is None or self._admin_names[0] != stamp:
            try:
                names = frozenset(self.admins.records())
            except AdminError as error:
                log.error("web administration: {reason}", reason=str(error))
                names = frozenset()
            self._admin_names = (stamp, names)
        return self._admin_names[1]

    @staticmethod
    def _arg(request: Request, name: str) -> str:
        values = (request.args or {}).get(name.encode("ascii"))
        if not values:
            return ""
        return bytes(values[0][:MAX_FIELD]).decode("utf-8", "replace")

    def _gk(self, session: AdminSession | None) -> Gatekeeper:
        assert session is not None
        return self.gk.acting_as(session.name, "web")

    async def _page(
        self, title: str, current: str, content: list[Any], session: AdminSession | None, status: int = 200
    ) -> Response:
        assert session is not None
        tag = pages.layout(
            title,
            current,
            content,
            admin=session.name,
            csrf=session.csrf,
            hostname=self.hostname,
            flashes=session.take_flashes(),
        )
        return Response(status, await pages.render_page(tag))

    # -- login and logout ---------------------------------------------------------------------

    async def get_stylesheet(self, request: Request, session: AdminSession | None) -> Response:
        """The stylesheet (the only one: the CSP allows no inline style)."""
        return Response(200, pages.STYLESHEET, "text/css; charset=utf-8")

    async def get_root(self, request: Request, session: AdminSession | None) -> Response:
        """The start page is the users list."""
        return redirect("/users")

    async def _login_form(
        self, request: Request, message: tuple[str, str] | None = None, name: str = "", status: int = 200
    ) -> Response:
        nonce = secrets.token_urlsafe(24)
        request.addCookie(
            LOGIN_COOKIE,
            nonce,
            path="/",
            secure=True,
            httpOnly=True,
            sameSite="strict",
            max_age=str(LOGIN_COOKIE_SECONDS),
        )
        if message is None and not self._current_admins():
            message = ("error", "No administrator exists yet: create one with `gatekeeper admin add NAME`.")
        tag = pages.login_page(login_token(self.login_key, nonce), hostname=self.hostname, message=message, name=name)
        return Response(status, await pages.render_page(tag))

    async def get_login(self, request: Request, session: AdminSession | None) -> Response:
        """The login form (with a fresh login nonce)."""
        message = None
        if self._arg(request, "ended"):
            message = ("error", "Your session has ended; please log in again.")
        elif self._arg(request, "out"):
            message = ("ok", "You are logged out.")
        return await self._login_form(request, message)

    async def post_login(self, request: Request, session: AdminSession | None) -> Response:
        """Check the login form's token, the throttle, then the password (in a worker)."""
        nonce = request.getCookie(LOGIN_COOKIE.encode())
        expected = login_token(self.login_key, nonce.decode("ascii", "replace")) if nonce else ""
        if not nonce or not tokens_match(self._arg(request, "csrf"), expected):
            raise _Refused(
                403,
                "Form refused",
                "The login form's security token is missing or out of date. Reload it and try again.",
            )
        name = self._arg(request, "name").strip()[:64]
        password = self._arg(request, "password")
        client = str(getattr(request.getClientAddress(), "host", "?"))
        wait = self.throttle.retry_after(name, client)
        if wait > 0:
            emit(
                log,
                "login",
                "web admin login throttled: {user} from {client}",
                outcome="throttled",
                protocol="admin-web",
                user=name,
                client=client,
            )
            return await self._login_form(
                request, ("error", f"Too many failed logins: try again in {int(wait) + 1} seconds."), name, status=429
            )
        ok = await self.workers.run(check_login, self.admins.path, name, password)
        if not ok:
            self.throttle.failed(name, client)
            emit(
                log,
                "login",
                "web admin login failed: {user} from {client}",
                level="warn",
                outcome="failed",
                protocol="admin-web",
                user=name,
                client=client,
            )
            return await self._login_form(request, ("error", "Wrong name or password."), name, status=403)
        self.throttle.succeeded(name)
        token, _ = self.sessions.create(name, client)
        emit(
            log,
            "login",
            "web admin {user} logged in from {client}",
            outcome="ok",
            protocol="admin-web",
            user=name,
            client=client,
        )
        request.addCookie(SESSION_COOKIE, token, path="/", secure=True, httpOnly=True, sameSite="strict")
        request.addCookie(LOGIN_COOKIE, "", path="/", secure=True, httpOnly=True, sameSite="strict", max_age="0")
        return redirect("/users")

    async def post_logout(self, request: Request, session: AdminSession | None) -> Response:
        """End the session and forget its cookie."""
        token = request.getCookie(SESSION_COOKIE.encode())
        self.sessions.end(token.decode("ascii", "replace") if token else None)
        request.addCookie(SESSION_COOKIE, "", path="/", secure=True, httpOnly=True, sameSite="strict", max_age="0")
        return redirect("/login?out=1")

    # -- users ------------------------------------------------------------------------------------

    async def get_users(self, request: Request, session: AdminSession | None) -> Response:
        """The users list: search and paging."""
        query = self._arg(request, "q").strip()[:254]
        try:
            number = max(1, int(self._arg(request, "page") or "1"))
        except ValueError:
            number = 1
        page = await self._gk(session).users_page(query, (number - 1) * USERS_PER_PAGE, USERS_PER_PAGE)
        assert session is not None
        return await self._page("Users", "users", pages.users_page(page, query, session.csrf), session)

    def _new_password(self, request: Request, session: AdminSession | None) -> str | None:
        """The form's new password when it was typed twice alike, else None (with a message)."""
        assert session is not None
        password = self._arg(request, "password")
        if not password:
            session.flash("error", "Type a password.")
            return None
        if not secrets.compare_digest(password.encode("utf-8"), self._arg(request, "confirm").encode("utf-8")):
            session.flash("error", "The two passwords differ: nothing was changed.")
            return None
        return password

    async def post_add_user(self, request: Request, session: AdminSession | None) -> Response:
        """Add a user with an initial password."""
        assert session is not None
        address = self._arg(request, "address").strip()
        if not address:
            session.flash("error", "Type the new user's address.")
            return redirect("/users")
        password = self._new_password(request, session)
        if password is None:
            return redirect("/users")
        try:
            info = await self._gk(session).add_user(address, password)
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return redirect("/users")
        session.flash(
            "ok",
            f"Added {info.address}: key {info.key_id}, certificate valid until {info.certificate_expires:%Y-%m-%d}.",
        )
        return redirect(_link("/user", address=info.address))

    async def _user_or_back(self, address: str, session: AdminSession | None) -> Any:
        assert session is not None
        try:
            return await self._gk(session).user(address)
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return None

    async def get_user(self, request: Request, session: AdminSession | None) -> Response:
        """One user and the forms acting on it."""
        assert session is not None
        user = await self._user_or_back(self._arg(request, "address"), session)
        if user is None:
            return redirect("/users")
        return await self._page(user.address, "users", pages.user_page(user, session.csrf), session)

    async def post_password(self, request: Request, session: AdminSession | None) -> Response:
        """Change a password with the current one: every key re-encrypted."""
        assert session is not None
        address = self._arg(request, "address")
        back = _link("/user", address=address)
        old = self._arg(request, "old_password")
        if not old:
            session.flash("error", "Type the current password (or use the reset below if it is lost).")
            return redirect(back)
        new = self._new_password(request, session)
        if new is None:
            return redirect(back)
        try:
            reset = await self._gk(session).reset_password(address, new, old)
        except BadPassword:
            session.flash("error", "The current password is wrong: nothing was changed.")
            return redirect(back)
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return redirect(back)
        session.flash("ok", f"Changed the password of {reset.user.address}: {reset.user.keys} key(s) re-encrypted.")
        return redirect(back)

    async def post_reset(self, request: Request, session: AdminSession | None) -> Response:
        """Reset a lost password: a new key pair, the old keys deleted and revoked."""
        assert session is not None
        address = self._arg(request, "address")
        back = _link("/user", address=address)
        if self._arg(request, "understood") != "1":
            session.flash("error", "Confirm that the old keys are to be deleted: nothing was changed.")
            return redirect(back)
        new = self._new_password(request, session)
        if new is None:
            return redirect(back)
        try:
            reset = await self._gk(session).reset_password(address, new, None)
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return redirect(back)
        session.flash(
            "ok",
            f"Reset the password of {reset.user.address}: new key {reset.user.key_id} issued; "
            "the old keys are deleted and their certificates revoked.",
        )
        return redirect(back)

    async def post_rotate(self, request: Request, session: AdminSession | None) -> Response:
        """Rotate a user's key pair (sealed now with the password, else at the next login)."""
        assert session is not None
        address = self._arg(request, "address")
        back = _link("/user", address=address)
        password = self._arg(request, "password") or None
        try:
            info = await self._gk(session).rotate(address, password)
        except BadPassword:
            session.flash("error", "The user's password is wrong: not rotated.")
            return redirect(back)
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return redirect(back)
        until = f"{info.certificate_expires:%Y-%m-%d}"
        if info.pending:
            session.flash(
                "ok",
                f"Rotated {info.address}: new certificate valid until {until}; the key is completed at the next login.",
            )
        else:
            session.flash("ok", f"Rotated {info.address}: new key {info.key_id}, valid until {until}.")
        return redirect(back)

    async def get_delete(self, request: Request, session: AdminSession | None) -> Response:
        """The confirmation page of a deletion."""
        assert session is not None
        user = await self._user_or_back(self._arg(request, "address"), session)
        if user is None:
            return redirect("/users")
        return await self._page(f"Delete {user.address}?", "users", pages.delete_page(user, session.csrf), session)

    async def post_delete(self, request: Request, session: AdminSession | None) -> Response:
        """Delete a user whose address was typed again."""
        assert session is not None
        address = self._arg(request, "address")
        if self._arg(request, "confirm").strip().casefold() != address.casefold() or not address:
            session.flash("error", "The address typed does not match: nothing was deleted.")
            return redirect(_link("/user/delete", address=address))
        try:
            deleted = await self._gk(session).delete_user(address)
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return redirect("/users")
        closed = f" ({deleted.sessions_closed} session(s) closed)" if deleted.sessions_closed else ""
        session.flash("ok", f"Deleted {deleted.address}; its certificates are revoked{closed}.")
        return redirect("/users")

    async def post_pkcs12(self, request: Request, session: AdminSession | None) -> Response:
        """The current key as a PKCS#12 download."""
        assert session is not None
        address = self._arg(request, "address")
        back = _link("/user", address=address)
        export_password = self._arg(request, "export_password")
        if not secrets.compare_digest(
            export_password.encode("utf-8"), self._arg(request, "export_confirm").encode("utf-8")
        ):
            session.flash("error", "The two file passwords differ: nothing was exported.")
            return redirect(back)
        try:
            data = await self._gk(session).export_pkcs12(
                address, self._arg(request, "password"), export_password, self._arg(request, "legacy") == "1"
            )
        except BadPassword:
            session.flash("error", "The user's password is wrong: nothing was exported.")
            return redirect(back)
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return redirect(back)
        return _download(data, "application/x-pkcs12", f"{address}.p12")

    async def get_certificate(self, request: Request, session: AdminSession | None) -> Response:
        """The user's current certificate as a PEM download."""
        assert session is not None
        try:
            address, pem = await self._gk(session).certificate(self._arg(request, "address"))
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return redirect("/users")
        return _download(pem, "application/x-pem-file", f"{address}.pem")

    # -- certificates -------------------------------------------------------------------------------

    async def get_certificates(self, request: Request, session: AdminSession | None) -> Response:
        """The key ring."""
        assert session is not None
        certificates = await self._gk(session).certificates()
        content = pages.certificates_page(certificates, session.csrf, MAX_UPLOAD)
        return await self._page("Certificates", "certificates", content, session)

    async def post_import(self, request: Request, session: AdminSession | None) -> Response:
        """Import an uploaded PEM, DER or PKCS#7 file."""
        assert session is not None
        files = (request.args or {}).get(b"file") or [b""]
        data = bytes(files[0])
        if not data.strip():
            session.flash("error", "Choose a certificate file to import (the file sent was empty).")
            return redirect("/certificates")
        if len(data) > MAX_UPLOAD:
            session.flash("error", f"The upload is too large: at most {MAX_UPLOAD // 1024} KiB is accepted.")
            return redirect("/certificates")
        try:
            imported = await self._gk(session).import_certificates(data)
        except GatekeeperError as error:
            session.flash("error", f"Nothing imported. {_message(error)}")
            return redirect("/certificates")
        names = "; ".join(
            f"{', '.join(info.addresses) or info.subject} ({info.fingerprint[:16]}\u2026)" for info in imported
        )
        session.flash("ok", f"Imported {len(imported)} certificate(s): {names}.")
        return redirect("/certificates")

    async def post_remove(self, request: Request, session: AdminSession | None) -> Response:
        """Remove a certificate from the key ring."""
        assert session is not None
        wanted = self._arg(request, "fingerprint")
        try:
            removed = await self._gk(session).remove_certificate(wanted)
        except GatekeeperError as error:
            session.flash("error", _message(error))
            return redirect("/certificates")
        if removed is None:
            session.flash("error", "No certificate with that fingerprint is in the key ring.")
        else:
            session.flash(
                "ok", f"Removed {', '.join(removed.addresses) or removed.subject} ({removed.fingerprint[:16]}\u2026)."
            )
        return redirect("/certificates")

    # -- lookup -----------------------------------------------------------------------------------------

    async def get_lookup(self, request: Request, session: AdminSession | None) -> Response:
        """The lookup form."""
        assert session is not None
        return await self._page("Lookup", "lookup", pages.lookup_page(session.csrf), session)

    async def post_lookup(self, request: Request, session: AdminSession | None) -> Response:
        """Run a lookup and show its trace (nothing changes, so it renders directly)."""
        assert session is not None
        address = self._arg(request, "address").strip()[:254]
        cached = self._arg(request, "cached") == "1"
        trace = None
        try:
            trace = await self._gk(session).lookup(address, cached=cached)
        except GatekeeperError as error:
            session.flash("error", _message(error))
        return await self._page("Lookup", "lookup", pages.lookup_page(session.csrf, address, trace), session)

    # -- status -----------------------------------------------------------------------------------------

    async def get_status(self, request: Request, session: AdminSession | None) -> Response:
        """Connectivity (the last check), sessions, counters and the chart."""
        assert session is not None
        gk = self._gk(session)
        content = pages.status_page(
            csrf=session.csrf,
            report=self.report,
            checked=self.checked,
            sessions=gk.sessions(),
            stats=gk.stats(),
            relays=self.activity.relays(),
            logins=self.activity.login_totals(),
        )
        return await self._page("Status", "status", content, session)

    async def post_check(self, request: Request, session: AdminSession | None) -> Response:
        """Run the connectivity check now (one at a time: a second request waits for the running one)."""
        assert session is not None
        try:
            report = await self.check()
        except GatekeeperError as error:
            session.flash("error", f"The check could not run: {_message(error)}")
            return redirect("/status")
        session.flash("ok" if report.ok else "error", report.verdict)
        return redirect("/status")

    async def check(self) -> CheckReport:
        """The connectivity check, shared by concurrent callers; the result is kept for the status page."""
        if self._check_waiters is not None:
            waiter: Deferred[CheckReport] = Deferred()
            self._check_waiters.append(waiter)
            return await waiter
        self._check_waiters = []
        try:
            report = await self.gk.check(timeout=CHECK_TIMEOUT)
        except Exception as error:
            waiters, self._check_waiters = self._check_waiters, None
            for waiting in waiters:
                waiting.errback(error)
            raise
        waiters, self._check_waiters = self._check_waiters, None
        self.report = report
        self.checked = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
        for waiting in waiters:
            waiting.callback(report)
        return report

    async def post_kick(self, request: Request, session: AdminSession | None) -> Response:
        """Disconnect a session."""
        assert session is not None
        try:
            number = int(self._arg(request, "session"))
        except ValueError:
            session.flash("error", "Not a session number.")
            return redirect("/status")
        if self._gk(session).kick(number):
            session.flash("ok", f"Disconnected session {number}.")
        else:
            session.flash("error", f"There is no session {number} (any more).")
        return redirect("/status")

    # -- audit ------------------------------------------------------------------------------------------

    async def get_audit(self, request: Request, session: AdminSession | None) -> Response:
        """The audit log, filtered, newest first."""
        assert session is not None
        query = self._arg(request, "q").strip()[:254]
        event = self._arg(request, "event") if self._arg(request, "event") in pages.AUDIT_EVENTS else ""
        operation = self._arg(request, "operation")[:64]
        try:
            offset = max(0, int(self._arg(request, "offset") or "0"))
        except ValueError:
            offset = 0
        page = await self._gk(session).audit_log(query, event, operation, offset, AUDIT_PER_PAGE)
        content = pages.audit_page(page, query=query, event=event, operation=operation, limit=AUDIT_PER_PAGE)
        return await self._page("Audit", "audit", content, session)


def _download(data: bytes, content_type: str, filename: str) -> Response:
    safe = _FILENAME_RE.sub("_", filename)[:200] or "download"
    return Response(200, data, content_type, (("Content-Disposition", f'attachment; filename="{safe}"'),))
