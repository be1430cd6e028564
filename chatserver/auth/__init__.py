"""Authentication: Cognito token rules, the dev issuer, and the HTTP auth routes."""
