"""Integrations with diffusers and transformers (imported as `bayeslayers.integrations`).

Importing this package stays light: diffusers/transformers load only inside the functions that need them.
"""
