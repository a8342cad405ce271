"""repository: the SQL token store and (later) Kerberos-style renewal."""
