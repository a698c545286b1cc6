"""Every error the SDK raises on purpose, in one tree.

The CLI maps ``MolmoEdgeError`` to ``error: <message>`` and a non-zero exit code
(``cli/main.py``); anything else is a bug and keeps its traceback. Messages name
the file, tensor, port, motor id or register involved and say what to do.
Hardware errors also subclass the matching builtin (``TimeoutError``,
``ConnectionError``) so generic handlers still work, as python-can does.
"""

from __future__ import annotations


class MolmoEdgeError(Exception):
    """Base of every error raised on purpose by molmoact2-edge."""

    exit_code = 1


# --- configuration, checkpoints, tokenizers -------------------------------------------------


class ConfigError(MolmoEdgeError, ValueError):
    """A config.json or preset is invalid or inconsistent."""


class CheckpointError(MolmoEdgeError):
    """A checkpoint directory is missing files, corrupt, or does not match the config."""


class TokenizerError(MolmoEdgeError):
    """A tokenizer file is missing or inconsistent with the config."""


class DependencyError(MolmoEdgeError, ImportError):
    """An optional dependency is missing; the message says what to install."""

    exit_code = 3


# --- data, simulation, training -------------------------------------------------------------


class DatasetError(MolmoEdgeError):
    """A dataset is missing, malformed or in an unsupported format version."""


class SimulationError(MolmoEdgeError):
    """The simulator could not be built or stepped."""


class TrainingError(MolmoEdgeError):
    """Training could not start or resume."""


# --- export and bundles ---------------------------------------------------------------------


class ExportError(MolmoEdgeError):
    """A checkpoint could not be exported to a bundle."""


class OpsetError(ExportError):
    """A graph uses an operator or opset the target parser (TensorRT 10.3) cannot read."""


class ParityError(ExportError):
    """An exported graph does not match the PyTorch reference within tolerance."""


class BundleError(MolmoEdgeError):
    """A bundle is missing a file, has an altered or extra file, or an unknown schema."""


class ContractError(BundleError):
    """A policy's robot contract (``contract.py``; cameras, joints and frame, rate, dims) is missing or malformed,
    or does not match the robot driving it, a flag, or what a remote server sent."""


class PromptTooLongError(MolmoEdgeError, ValueError):
    """A prompt does not fit the bundle's fixed bucket (never truncated)."""


# --- runtimes -------------------------------------------------------------------------------


class BackendError(MolmoEdgeError):
    """An inference backend failed to load or run."""


class BackendUnavailableError(BackendError, DependencyError):
    """The requested backend's libraries or devices are not present (no silent fallback)."""


class ObservationError(MolmoEdgeError, ValueError):
    """An observation is missing a camera or state, or has the wrong shape or dtype."""


# --- hardware -------------------------------------------------------------------------------


class HardwareError(MolmoEdgeError):
    """Base of hardware errors."""

    exit_code = 4


class PortError(HardwareError, ConnectionError):
    """A serial port or CAN channel could not be opened or was lost."""


class BusError(HardwareError):
    """A bus transaction failed."""


class BusTimeoutError(BusError, TimeoutError):
    """A device did not answer within the transaction timeout."""


class ChecksumError(BusError):
    """A reply failed its checksum or framing check."""


class ServoError(BusError):
    """A servo reported error flags (overload, overheat, voltage, ...)."""

    def __init__(self, message: str, motor_id: int | None = None, flags: tuple[str, ...] = ()):
        super().__init__(message)
        self.motor_id = motor_id
        self.flags = flags


class CalibrationError(HardwareError):
    """A calibration file is missing, malformed or does not match the robot."""


class CameraError(HardwareError):
    """A camera could not be opened or stopped delivering frames."""


class SafetyError(HardwareError):
    """The safety layer stopped the robot (dead bus, servo fault, watchdog)."""


class PreflightError(HardwareError):
    """A check before the bus opens failed (camera, calibration, port, record folder, contract); nothing moved."""


class FirstMoveError(SafetyError):
    """The policy's first target is too far from the present pose (frame or calibration mistake); nothing moved."""


class RegisterError(HardwareError, ValueError):
    """A register name is unknown for the servo model, is read-only, or a value does not fit it."""


# --- serving (``molmo-edge serve`` and ``run --policy ws://``) ----------------------------------


class ServingError(MolmoEdgeError):
    """The policy server cannot start, or refused a request (the message says why)."""


class CodecError(ServingError, ValueError):
    """A message is not msgpack-numpy, or carries a refused dtype or an inconsistent array."""


class PolicyConnectionError(ServingError, ConnectionError):
    """The connection to a remote policy server was lost, refused or timed out."""
