"""What the node has received and made: the files on disk (:mod:`.files`), the index of studies,
series, instances, jobs and the outbox (:mod:`.index`, with the state enums of :mod:`.states`),
the structural checks of incoming objects (:mod:`.integrity`), the queries the rest of the product
asks of the index (:mod:`.queries`, :mod:`.overview`), the Q/R matching that C-FIND and QIDO-RS
share (:mod:`.matching`) and the outbox: enqueue, delivery and the one rule of what is released
when (:mod:`.outbox`).
"""
