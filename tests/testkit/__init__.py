"""Test-only tools: the bench namespace, the differential fuzzer, independent checksum
checks. Not shipped in the package."""
