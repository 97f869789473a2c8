"""targets: device profiles as data (profiles.py) and host detection (host.py).

    from sparsedge.targets import TARGETS, get_target, detect_host, status, export_config
    status(get_target("laptop-x86"), detect_host()).text     # "runs here"
    cfg = export_config("laptop-x86")                        # an ExportConfig for export()

``--target host`` picks this host's own profile (host_target). ``sparsedge targets`` lists the profiles and what runs on this host; ``sparsedge export MODEL
--target NAME`` exports with a profile's formats and quantization and records it in the manifest.
"""

from .host import Host, Status, detect_host, host_target, report, status, unmet
from .profiles import TARGETS, Requirement, TargetProfile, export_config, get_target

__all__ = ["TARGETS", "TargetProfile", "Requirement", "get_target", "export_config",
           "Host", "Status", "detect_host", "host_target", "status", "unmet", "report"]
