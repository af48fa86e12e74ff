"""Bearer tokens of the HTTP ingress: resolved to a sha256 in the driver, checked in constant time in replicas.

Only the hash travels to replicas (never the token), and ``info()`` says only whether a token is set.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from kdcore.errors import UserError


def resolve_token_sha256(http) -> str | None:
    """sha256 (hex) of the bearer token an HTTPSpec asks for, or None when it asks for none.

    A configured token that cannot be read is an error: the server must not start open."""
    if not (http.token_file or http.token_env):
        return None
    token = None
    if http.token_file:
        p = Path(http.token_file)
        if not p.is_file():
            raise UserError(f"teacher.serve.http.token_file: {p} does not exist; write the bearer token there or "
                            "remove token_file")
        token = p.read_text().strip()
    elif http.token_env:
        token = (os.environ.get(http.token_env) or "").strip()
        if not token:
            raise UserError(f"teacher.serve.http.token_env: environment variable {http.token_env} is not set (or "
                            "empty); set it to the bearer token, or remove token_env")
    if not token:
        raise UserError(f"teacher.serve.http.token_file: {http.token_file} is empty")
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_problem(authorization: str, token_sha256: str | None) -> str | None:
    """Why an ``Authorization`` header value does not grant access (None: it does, or no token is set)."""
    if token_sha256 is None:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "missing bearer token: send 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), token_sha256):
        return "wrong bearer token"
    return None
