"""Walks over nested JSON values, shared by the pipeline tests."""


def numbers(value):
  """Yield every number in a nested JSON value."""
  if isinstance(value, dict):
    for item in value.values():
      yield from numbers(item)
  elif isinstance(value, list):
    for item in value:
      yield from numbers(item)
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    yield value
