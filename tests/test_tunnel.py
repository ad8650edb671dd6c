"""
Unit tests of the tunnel's handshake rules and WebSocket settings.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rexecpf.tunnel import choose_credentials
from rexecpf.wsend import AUTO_FRAGMENT_SIZE, MAX_FRAME_PAYLOAD, protocol_options, xor_masker_name


class CredentialsTests(SynchronousTestCase):
    def test_bearer_pair(self):
        """``['Bearer', TOKEN]`` gives the token and selects ``Bearer``."""
        self.assertEqual(choose_credentials(["Bearer", "t0k"], None), ("t0k", "Bearer"))

    def test_bearer_without_token(self):
        """A lone ``Bearer`` presents no token."""
        self.assertEqual(choose_credentials(["Bearer"], None), (None, None))

    def test_hosted(self):
        """``rexec.token.TOKEN`` gives the token; ``rexec.v1`` is selected only when offered."""
        self.assertEqual(
            choose_credentials(["rexec.v1", "rexec.token.abc"], None), ("abc", "rexec.v1")
        )
        self.assertEqual(choose_credentials(["rexec.token.abc"], None), ("abc", None))

    def test_header(self):
        """The ``Authorization: Bearer`` header gives the token, no subprotocol."""
        self.assertEqual(choose_credentials([], "Bearer xyz"), ("xyz", None))
        self.assertEqual(choose_credentials([], "Basic xyz"), (None, None))

    def test_subprotocol_wins(self):
        """A token in the subprotocols is used before the header."""
        self.assertEqual(choose_credentials(["Bearer", "a"], "Bearer b"), ("a", "Bearer"))


class SettingsTests(SynchronousTestCase):
    def test_native_masker(self):
        """
        Autobahn's native (NVX) XOR masker is in use: unmasking client
        frames is not done in pure Python.
        """
        from autobahn.websocket import USES_NVX

        self.assertTrue(USES_NVX)
        self.assertTrue(xor_masker_name().startswith("autobahn.nvx."), xor_masker_name())

    def test_caps(self):
        """Frames and messages from peers are capped; frames to peers are 64 KiB."""
        options = protocol_options()
        self.assertEqual(options["maxFramePayloadSize"], MAX_FRAME_PAYLOAD)
        self.assertEqual(options["autoFragmentSize"], AUTO_FRAGMENT_SIZE)
        self.assertEqual(AUTO_FRAGMENT_SIZE, 65536)
