"""The Analyze service: runs each policy's ``analyze`` per application at its interval."""
