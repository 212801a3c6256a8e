"""Channels of the FMI communicator: direct TCP, Redis and object storage."""
