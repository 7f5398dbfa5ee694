"""The registry client: oras's, with kubetune's authentication, timeouts, retries and error mapping.

A request that gets a 401 is answered as the registry's challenge asks (basic credentials, or a
bearer token from the realm it names, which must be HTTPS unless it is on loopback); one that
cannot reach the registry, or gets a 5xx or 429, is tried :data:`ATTEMPTS` times; a 401 or 403
that remains is an :class:`OciAuthError` naming where the credentials came from, never what they are.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from typing import Any, Final

import oras.container
import oras.defaults
import oras.provider
import requests

from kubetune_trainer.oci.credentials import Credentials
from kubetune_trainer.oci.reference import Reference, is_loopback_host, scheme_for

_CONNECT_TIMEOUT_S: Final = 15.0
_READ_TIMEOUT_S: Final = 300.0
#: Tries of one request when the registry cannot be reached or answers 5xx/429, and the pause before each retry.
ATTEMPTS: Final = 3
_BACKOFF_S: Final = 1.0
#: Most bytes of an error answer read for its message.
_MAX_ERROR_BYTES: Final = 64 << 10


class OciError(Exception):
    """A push or pull failed: ``permanent`` when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class OciAuthError(OciError):
    """The registry refused the request (401 or 403); always permanent."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, permanent=True)
        self.status = status


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` as ``("bearer", {"realm": …, "service": …})``."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in re.findall(r'([A-Za-z]+)="([^"]*)"', rest)}


def short_reason(exc: BaseException) -> str:
    """A one-line reason for a connection error, without the library's nested repr."""
    text = str(exc)
    found = re.search(r"\[Errno [-0-9]+\] [^'\")]+|Connection refused|timed out|Name or service not known", text)
    return found.group(0) if found else type(exc).__name__


class RegistryClient(oras.provider.Registry):  # type: ignore[misc]  # oras ships no annotations
    """oras's registry client with kubetune's authentication, timeouts, retries and error mapping."""

    def __init__(self, host: str, credentials: Credentials | None, *, credential_source: str, fix: str = "") -> None:
        super().__init__(hostname=host, insecure=scheme_for(host) == "http", auth_backend="basic")
        self.host = host
        self.credentials = credentials
        self.credential_source = credential_source
        self.fix = fix
        self.authorization: str | None = None
        self.session.headers["User-Agent"] = "kubetune"

    def container(self, ref: Reference) -> oras.container.Container:
        """An oras Container for ``ref`` (set field by field: oras's parser would take ``a.b/c`` for a registry)."""
        container = oras.container.Container("kubetune/placeholder:latest", registry=self.host)
        namespace, _, repository = ref.repository.rpartition("/")
        container.registry = self.host
        container.namespace = namespace or None
        container.repository = repository
        container.tag = ref.tag or oras.defaults.default_tag
        container.digest = ref.digest
        return container

    def do_request(  # noqa: PLR0917 - oras's signature; it passes these positionally
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        """Send one request: authenticate on a 401, retry unreachable and 5xx, raise on 401/403."""
        last: OciError | None = None
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(_BACKOFF_S * attempt)
            try:
                response = self._send(method, url, data=data, headers=dict(headers or {}), json=json, stream=stream)
            except requests.exceptions.SSLError as exc:
                raise OciError(
                    f"TLS with registry {self.host} failed ({short_reason(exc)}); kubetune speaks HTTPS to every registry "
                    "but a loopback one: give the registry a certificate this pod trusts (REQUESTS_CA_BUNDLE)",
                    permanent=True,
                ) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                last = OciError(
                    f"cannot reach registry {self.host} over {scheme_for(self.host).upper()} ({short_reason(exc)})",
                    permanent=False,
                )
                continue
            if response.status_code >= 500 or response.status_code == 429:
                last = OciError(
                    f"registry {self.host} answered HTTP {response.status_code} {response.reason} to {method} "
                    f"{urllib.parse.urlsplit(url).path}",
                    permanent=False,
                )
                response.close()
                continue
            if response.status_code in (401, 403):
                raise self._refused(response.status_code)
            return response
        assert last is not None
        raise last

    def _send(
        self, method: str, url: str, *, data: Any, headers: dict[str, str], json: Any, stream: bool
    ) -> requests.Response:
        def send() -> requests.Response:
            if self.authorization:
                headers["Authorization"] = self.authorization
            response: requests.Response = self.session.request(
                method,
                url,
                data=data,
                json=json,
                headers=headers,
                stream=stream,
                verify=self._tls_verify,
                timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),
            )
            return response

        response = send()
        if response.status_code == 401 and self._authenticate(response):
            response.close()
            response = send()
        return response

    def _authenticate(self, response: requests.Response) -> bool:
        """Set ``authorization`` as the 401's challenge asks; ``False`` when there is nothing new to try."""
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None or self.authorization == self.credentials.basic:
                return False
            self.authorization = self.credentials.basic
            return True
        if scheme != "bearer" or not params.get("realm"):
            return False
        realm = params["realm"]
        realm_parts = urllib.parse.urlsplit(realm)
        if realm_parts.scheme != "https" and not is_loopback_host(realm_parts.netloc):
            raise OciError(
                f"registry {self.host} sends clients to the token service {realm_parts.netloc} over plain HTTP; "
                "kubetune sends credentials only over HTTPS",
                permanent=True,
            )
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        token_headers = {"Authorization": self.credentials.basic} if self.credentials else {}
        try:
            answer = self.session.get(
                realm,
                params=query,
                headers=token_headers,
                verify=self._tls_verify,
                timeout=(_CONNECT_TIMEOUT_S, 60.0),
            )
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise OciError(
                f"cannot reach the token service of registry {self.host} ({short_reason(exc)})", permanent=False
            ) from None
        if answer.status_code in (401, 403):
            raise self._refused(answer.status_code)
        if answer.status_code >= 500:
            raise OciError(
                f"the token service of registry {self.host} answered HTTP {answer.status_code}", permanent=False
            )
        try:
            body = answer.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            return False
        bearer = f"Bearer {token}"
        if bearer == self.authorization:
            return False
        self.authorization = bearer
        return True

    def _refused(self, status: int) -> OciAuthError:
        if self.credentials is None:
            message = (
                f"registry {self.host} asks for credentials (HTTP {status}) and none were given; "
                f"use {self.credential_source} with an entry for {self.host}"
            )
            if self.fix:
                message += f"; {self.fix}"
        elif status == 401:
            message = (
                f"registry {self.host} refused the credentials of user {self.credentials.username!r} from "
                f"{self.credential_source} (HTTP 401); fix the user name and password for {self.host} there"
            )
            if self.fix:
                message += f"; {self.fix}"
        else:
            message = (
                f"registry {self.host} denied user {self.credentials.username!r} from {self.credential_source} "
                f"(HTTP 403); grant that user access to the repository, or use credentials that have it"
            )
        return OciAuthError(message, status=status)

    def check(self, response: requests.Response, what: str) -> None:
        """Raise a permanent :class:`OciError` naming ``what`` and the registry's own words unless 2xx."""
        if 200 <= response.status_code < 300:
            return
        detail = ""
        try:  # the first 64 KiB of the body at most: a registry's words are short
            head = next(response.iter_content(chunk_size=_MAX_ERROR_BYTES), b"")
        except requests.exceptions.RequestException:
            head = b""
        try:
            errors = json.loads(head).get("errors") or []
            words = [f"{e.get('code', '')}: {e.get('message', '')}" for e in errors if isinstance(e, dict)]
            detail = "; ".join(words)[:500]
        except (ValueError, AttributeError, RecursionError, TypeError):
            detail = head[:200].decode("utf-8", "replace")
        raise OciError(
            f"registry {self.host} answered HTTP {response.status_code} {response.reason} to {what}"
            + (f" ({detail})" if detail else ""),
            permanent=True,
        )
