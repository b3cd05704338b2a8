"""JSON log lines for log shippers (``twistd --logger gatekeeper.jsonlog.observer``)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper import jsonlog
from gatekeeper.events import emit


class Opaque:
    def __str__(self) -> str:
        return "<an opaque object>"


class JsonLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.publisher = LogPublisher(jsonlog.json_observer(self.out))
        self.log = Logger(namespace="gatekeeper.test", observer=self.publisher)

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def test_an_event_is_one_json_line(self) -> None:
        emit(
            self.log,
            "login",
            "login ok: {user} from {client} ({protocol})",
            outcome="ok",
            user="alice@example.org",
            client="192.0.2.1",
            protocol="smtp",
        )
        (line,) = self.lines()
        self.assertEqual(line["message"], "login ok: alice@example.org from 192.0.2.1 (smtp)")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["namespace"], "gatekeeper.test")
        self.assertEqual(line["gk_event"], "login")
        self.assertIs(line["gk_audit"], False)
        self.assertEqual((line["outcome"], line["user"], line["protocol"]), ("ok", "alice@example.org", "smtp"))
        self.assertTrue(str(line["time"]).endswith("Z"))
        self.assertFalse([key for key in line if key.startswith("log_")])

    def test_values_of_any_type(self) -> None:
        self.log.warn(
            "odd {thing}", thing=Opaque(), raw=b"\xff bytes", numbers=(1, 2.5), nested={"a": [1, {"b": None}]}
        )
        (line,) = self.lines()
        self.assertEqual(line["level"], "warn")
        self.assertEqual(line["thing"], "<an opaque object>")
        self.assertEqual(line["message"], "odd <an opaque object>")
        self.assertEqual(line["raw"], "\ufffd bytes")
        self.assertEqual(line["numbers"], [1, 2.5])
        self.assertEqual(line["nested"], {"a": [1, {"b": None}]})

    def test_a_failure_carries_its_traceback(self) -> None:
        try:
            raise ValueError("broken on purpose")
        except ValueError:
            self.log.failure("something failed for {who}", who="alice@example.org")
        (line,) = self.lines()
        self.assertEqual(line["level"], "critical")
        self.assertEqual(line["error"], "ValueError: broken on purpose")
        self.assertIn("Traceback", str(line["traceback"]))
        self.assertEqual(line["message"], "something failed for alice@example.org")

    def test_twistd_logger_factory_writes_to_the_named_file(self) -> None:
        path = Path(self.mktemp())
        script = (
            "from twisted.logger import Logger, LogPublisher\n"
            "from gatekeeper import jsonlog\n"
            "Logger(observer=LogPublisher(jsonlog.observer())).info('hello {who}', who='world')\n"
        )
        environment = dict(os.environ, GATEKEEPER_JSON_LOG=str(path))
        subprocess.run([sys.executable, "-c", script], env=environment, check=True, timeout=60)
        (line,) = [json.loads(text) for text in path.read_text().splitlines()]
        self.assertEqual((line["message"], line["who"]), ("hello world", "world"))
        environment.pop("GATEKEEPER_JSON_LOG")
        result = subprocess.run(
            [sys.executable, "-c", script], env=environment, check=True, timeout=60, capture_output=True, text=True
        )
        self.assertEqual(json.loads(result.stdout)["message"], "hello world")
