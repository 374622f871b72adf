"""One module per `ktpipe` command (pipeline stage), each exposing a click `command`."""
