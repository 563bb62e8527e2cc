"""Instance metadata: the IMDSv2 client, pure parsers of notice answers, and the instance identity."""
