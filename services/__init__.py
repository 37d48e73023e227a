"""The five MAPE services. Each subpackage is started on its own and imports only ``mlsysops``."""
