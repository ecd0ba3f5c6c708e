"""adaspec: LLM serving with adaptive, SLO-aware speculative decoding."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adaspec")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

from adaspec.engine.sampling import SamplingParams  # noqa: E402
from adaspec.engine.sequence import SLO  # noqa: E402
from adaspec.llm import LLM, RequestOutput  # noqa: E402

__all__ = ["LLM", "SLO", "RequestOutput", "SamplingParams", "__version__"]
