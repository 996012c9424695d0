"""What users and schedules ask of the image catalog: schedules and their windows, retention, image deletion, API
tokens. Domain code: the state and object stores are handed in; nothing here knows HTTP, the engine or the CLI."""
