"""Identity and access: who is calling (keys, sessions, passwords, LDAP) and what they may do."""
