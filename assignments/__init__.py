"""The graded assignment cut from the real code (docs/assignments.md): make the student copy, write the key, grade."""
