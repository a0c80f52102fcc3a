"""A fake Azure Resource Manager on 127.0.0.1 for the deployments of one Cognitive Services account, reached by
Microsoft's real SDK (azure-mgmt-cognitiveservices).

azure-core refuses to send a bearer token over plain http, so the fake serves TLS with a throwaway self-signed
certificate; the SDK's requests transport trusts it through $REQUESTS_CA_BUNDLE (``trust(monkeypatch)``).
PUT answers 201 Creating (200 Updating for an existing deployment) and the deployment reaches Succeeded (or
Failed, for a model in ``fail_models``) after ``polls_to_finish`` GETs, as ARM's provisioningState does; a SKU
in ``refuse_skus`` is refused the way Azure refuses a deployment type a model does not offer. A wrong bearer
token is a 401 that echoes it back (the worst a server can do: the client must scrub it). Everything received
is kept in ``requests``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

from services import serve_in_thread, stop_serving


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA (so it can be the client's whole trust store), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class FakeAzure:
    def __init__(self, token: str, subscription: str = "sub-1", resource_group: str = "rg-tuneloop",
                 account: str = "acct", polls_to_finish: int = 2):
        self.token, self.subscription, self.resource_group, self.account = token, subscription, resource_group, account
        self.polls_to_finish = polls_to_finish
        self.deployments: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.refuse_skus: set[str] = set()
        self.fail_models: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._folder = tempfile.TemporaryDirectory(prefix="fake-azure-")
        self.ca_file = Path(self._folder.name) / "cert.pem"

    # ---- server ----------------------------------------------------------------------------------
    def __enter__(self) -> FakeAzure:
        fake = self
        cert, key = self_signed_certificate(Path(self._folder.name))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self, method: str):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = fake.dispatch(method, self.path, dict(self.headers), body)
                raw = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.send_header("x-ms-request-id", "fake")
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._handle("GET")

            def do_PUT(self):
                self._handle("PUT")

            def do_DELETE(self):
                self._handle("DELETE")

        self._server = serve_in_thread(Handler, tls=(cert, key))
        return self

    def __exit__(self, *exc) -> None:
        stop_serving(self._server)
        self._folder.cleanup()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def trust(self, monkeypatch) -> None:
        """Make the SDK's transport (requests) trust the fake's certificate, and only it, for this test."""
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(self.ca_file))

    def settings(self, **extra) -> dict[str, Any]:
        """``train.openai.azure_deployments`` pointing at this fake."""
        return {"subscription_id": self.subscription, "resource_group": self.resource_group, "account": self.account,
                "management_endpoint": self.endpoint, "poll_seconds": 0.01, **extra}

    # ---- what tests ask ----------------------------------------------------------------------------
    def serving(self, name: str) -> str | None:
        """The model a deployment serves once provisioned; None when it does not exist or is not ready (the
        data plane's DeploymentNotFound)."""
        with self.lock:
            d = self.deployments.get(name)
            ok = d is not None and d["properties"]["provisioningState"] == "Succeeded"
            return d["properties"]["model"]["name"] if ok else None

    def calls(self, method: str) -> list[str]:
        """The deployment names that ``method`` requests addressed, in order."""
        return [urlparse(path).path.rsplit("/", 1)[-1] for m, path, _, _ in self.requests
                if m == method and "/deployments/" in path]

    # ---- routing ---------------------------------------------------------------------------------
    def dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes):
        url = urlparse(raw_path)
        query = dict(parse_qsl(url.query))
        with self.lock:
            self.requests.append((method, raw_path, headers, body))
            auth = headers.get("Authorization") or headers.get("authorization") or ""
            if auth != f"Bearer {self.token}":
                return 401, {"error": {"code": "InvalidAuthenticationToken",
                                       "message": f"The access token is invalid: {auth}"}}
            if not query.get("api-version"):
                return 400, {"error": {"code": "MissingApiVersionParameter", "message": "api-version is required"}}
            base = (f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}/providers/"
                    f"Microsoft.CognitiveServices/accounts/{self.account}/deployments")
            if url.path == base and method == "GET":
                return 200, {"value": list(self.deployments.values())}
            m = re.fullmatch(re.escape(base) + r"/([^/]+)", url.path)
            if not m:
                return 404, {"error": {"code": "ResourceNotFound", "message": f"no route {method} {url.path}"}}
            name = m[1]
            if method == "PUT":
                return self.put(name, json.loads(body), f"{base}/{name}")
            if method == "GET":
                return self.get(name)
            if method == "DELETE":
                return (200, None) if self.deployments.pop(name, None) is not None else (204, None)
            return 405, {"error": {"code": "MethodNotAllowed", "message": method}}

    def put(self, name: str, req: dict[str, Any], resource_id: str):
        sku, model = req.get("sku") or {}, ((req.get("properties") or {}).get("model") or {})
        if sku.get("name") in self.refuse_skus:
            return 400, {"error": {"code": "InvalidResourceProperties",
                                   "message": f"The specified SKU '{sku.get('name')}' for model '{model.get('name')}' "
                                              "is not supported in this region."}}
        existing = name in self.deployments
        self.deployments[name] = {
            "id": resource_id, "name": name, "type": "Microsoft.CognitiveServices/accounts/deployments",
            "sku": sku, "tags": req.get("tags") or {},
            "properties": {"model": model, "provisioningState": "Updating" if existing else "Creating"}}
        self.polls[name] = 0
        return (200 if existing else 201), self.deployments[name]

    def get(self, name: str):
        d = self.deployments.get(name)
        if d is None:
            return 404, {"error": {"code": "DeploymentNotFound", "message": f"Deployment {name} not found"}}
        props = d["properties"]
        if props["provisioningState"] in ("Creating", "Updating"):
            self.polls[name] += 1
            if self.polls[name] >= self.polls_to_finish:
                props["provisioningState"] = "Failed" if props["model"].get("name") in self.fail_models else "Succeeded"
        return 200, d
