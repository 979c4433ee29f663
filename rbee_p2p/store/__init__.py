"""Local files a node keeps: its identity key and its audit log."""
