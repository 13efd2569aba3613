-- One database per ModelYard service (each migrates its own tables at start-up), owned by the compose user.
-- Run once by the postgres image when its data volume is empty (/docker-entrypoint-initdb.d).
CREATE DATABASE registry OWNER modelyard;
CREATE DATABASE training OWNER modelyard;
CREATE DATABASE quantization OWNER modelyard;
CREATE DATABASE evaluation OWNER modelyard;
CREATE DATABASE inference OWNER modelyard;
CREATE DATABASE pipeline OWNER modelyard;
CREATE DATABASE gateway OWNER modelyard;
