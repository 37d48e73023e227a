"""mlsysops: the shared package of the MAPE services.

Every service (``services.monitor``, ``services.analyzer``, ...) imports from here and
nowhere else; services never import each other. Plugins import only
:mod:`mlsysops.plugin_api`.
"""

__version__ = "0.1.0"
