"""Administrative and account routes: /auth (one's own session, password, TOTP, keys) and
/admin (users, keys, roles). Routes translate; `IdentityService` decides."""
