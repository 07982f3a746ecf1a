"""The transport seam between roles: publish with confirm, consume with manual ack, dead-letter with a reason."""
