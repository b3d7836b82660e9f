"""Web demo (``linfusion demo``): original and accelerated images side by side, with their times.

``engine`` holds the logic and needs no Gradio; ``ui`` builds the Gradio page; ``cli`` the command.
"""
