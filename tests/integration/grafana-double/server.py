"""The double's Grafana: /api/health, and /api/user behind basic auth as the admin user."""

import base64
import http.server
import os

USER = os.environ.get("GF_SECURITY_ADMIN_USER") or "admin"
PASSWORD = os.environ.get("GF_SECURITY_ADMIN_PASSWORD") or "admin"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/api/health":
            self.answer(200, b'{"database": "ok"}')
        elif self.path == "/api/user":
            expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") == f"Basic {expected}":
                self.answer(200, b'{"login": "%s"}' % USER.encode())
            else:
                self.answer(401, b'{"message": "invalid username or password"}')
        else:
            self.answer(404, b'{"message": "not found"}')

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


http.server.ThreadingHTTPServer(("0.0.0.0", 3000), Handler).serve_forever()
