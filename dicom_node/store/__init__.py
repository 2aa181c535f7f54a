"""What the node has received and made: the files on disk (:mod:`.files`), the index of studies,
series, instances, jobs and the outbox (:mod:`.index`, with the state enums of :mod:`.states`),
the structural checks of incoming objects (:mod:`.integrity`), the queries the rest of the product
asks of the index (:mod:`.queries`, :mod:`.overview`) and the outbox, enqueue and delivery
together (:mod:`.outbox`).
"""
