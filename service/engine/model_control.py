"""Which model load and unload requests the API serves: Triton's ``--model-control-mode``.

* ``none`` (the default): every model in the repository loads at the start; load and unload
  requests are refused with UNAVAILABLE, with Triton's message.
* ``explicit``: load and unload requests are served; ``--load-model`` picks what loads at the
  start (nothing without it; ``*`` for every model).
* ``poll``: the repository is watched (:mod:`service.engine.poller`) and its changes applied;
  load and unload requests are refused as in ``none``, except the ones one worker of
  ``serve --workers`` repeats on its siblings, which are how every worker applies a change.

The repository index answers in every mode. Load parameters that carry model files (Triton's
``file:<path>``) are refused unless ``--allow-model-upload`` is given, and even then, since this
server does not write uploaded files (they go into the model repository instead).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from service.core.errors import InvalidArgument, Unavailable, Unimplemented
from service.core.settings import Settings

__all__ = ["NOT_ALLOWED", "ModelControl"]

NOT_ALLOWED = "explicit model load / unload is not allowed if polling is enabled"
"""Triton's message for a load or unload outside explicit mode (it says "polling" in none mode
too), kept word for word so clients that match it keep working."""
FILE_PREFIX = "file:"


@dataclass(frozen=True)
class ModelControl:
    """The model control mode and whether model files may come with a load request.

    Attributes:
        mode: ``none``, ``explicit`` or ``poll``.
        allow_upload: ``--allow-model-upload``.
    """

    mode: str
    allow_upload: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelControl:
        """The server's model control from its settings."""
        return cls(settings.model_control_mode, settings.allow_model_upload)

    def check_request(self, from_sibling: bool) -> None:
        """Refuse a load or unload request that this mode does not serve.

        ``from_sibling``: the request is another worker's repeat of a change it applied.

        Raises:
            Unavailable: the mode is not explicit (nor a sibling's repeat in poll mode).
        """
        if self.mode == "explicit" or (self.mode == "poll" and from_sibling):
            return
        raise Unavailable(
            f"{NOT_ALLOWED} (this server runs with --model-control-mode {self.mode}; start it "
            "with --model-control-mode explicit to load and unload models over the API)"
        )

    def check_load_parameters(self, keys: Collection[str]) -> None:
        """Refuse load parameters: model files unless allowed (and unwritten even then), others.

        Raises:
            InvalidArgument: model files without ``--allow-model-upload``, or a parameter this
                server does not take (config overrides).
            Unimplemented: model files with ``--allow-model-upload``.
        """
        files = sorted(key for key in keys if key.startswith(FILE_PREFIX))
        if files and not self.allow_upload:
            # INVALID_ARGUMENT rather than UNAVAILABLE: the refusal holds for as long as the
            # server runs, so a client must not retry it as it would a transient UNAVAILABLE;
            # Triton also answers load parameters it does not take with INVALID_ARGUMENT.
            raise InvalidArgument(
                f"load parameter '{files[0]}' carries model files, which this server refuses: "
                "it was started without --allow-model-upload; place the files in the model "
                "repository instead"
            )
        if files:
            raise Unimplemented(
                f"load parameter '{files[0]}': loading model files sent with the request is "
                "not implemented; place the files in the model repository instead"
            )
        if keys:
            raise InvalidArgument(
                "load parameters (config overrides, model files) are not "
                "supported; place the files in the repository"
            )
