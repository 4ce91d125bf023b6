from .cli import cli

if __name__ == "__main__":  # the --jobs workers import this module again
    cli()
