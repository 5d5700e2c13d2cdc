"""Calibration: data, recorder (hooks with one owner), profile format and the calibrate() API."""

from .data import CalibrationData, load_tags, load_texts, pack
from .profile import LayerProfile, Profile, config_fingerprint
from .recorder import ExpertRecorder
from .run import calibrate, profile_model

__all__ = ["CalibrationData", "ExpertRecorder", "LayerProfile", "Profile", "calibrate", "config_fingerprint",
           "load_tags", "load_texts", "pack", "profile_model"]

from .._callable import make_callable  # noqa: E402

make_callable(__name__, calibrate)  # rq_tool.calibrate(...) is the API, the package stays importable
