"""moechat's front ends: the command line, the web page and the HTTP API. Thin: logic lives in
``backends`` and in plain functions here that the page and the API both call."""
