"""The application: the command line, the daemon, the demo and the metrics.

The only code that imports the parts (producer, repository, transfer); it
wires them through tokenlife.app.site.
"""
