"""Wire contracts shared by the leader, the workers, the HTTP front and the admin tool.

Every message is a dataclass; on the wire it is a msgpack map with a ``type`` field and an ``id``.
"""
