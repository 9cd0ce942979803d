"""The expected failures: each is one line on stderr and an exit code of its own (`ladd.cli`), never a
traceback. Any module may raise them; this module imports nothing of ladd."""


class ConfigError(ValueError):
    """A params.yaml setting that is wrong or cannot be served (names the key)."""


class ValidationFailed(RuntimeError):
    """A Great Expectations suite failed on the data (its report names the failed expectations)."""


class DataError(ValueError):
    """An input table or image that cannot be read as the data set it should be (names the file and record)."""


class StaleInput(FileNotFoundError):
    """An input made by an earlier stage under other settings than params.yaml's now: rerun that stage (exit 4, like
    a missing input)."""


class TeacherError(ValueError):
    """A folder that is not an SD3-family diffusers pipeline."""


class ParityError(RuntimeError):
    """An ONNX export whose outputs differ from PyTorch's beyond the tolerance."""


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer."""


class Busy(OSError):
    """An output that another run is writing."""
