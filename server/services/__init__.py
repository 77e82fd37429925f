"""The use cases behind the RPCs: plain dataclasses in and out, no protocol types."""
