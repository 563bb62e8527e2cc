"""Local stand-ins for the cloud, for rehearsal, the demo and the tests: IMDS, AWS APIs, block devices."""
