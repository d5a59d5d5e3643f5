"""One Stack per concern, composed from constructs_lib; settings come from cdk.json via app.py."""
