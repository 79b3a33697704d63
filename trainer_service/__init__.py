"""The trainer service: runs the user's trainers and pushes the weights they change."""
